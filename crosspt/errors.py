"""User-facing errors. Each carries one clear line naming the problem; the CLI prints it, exits non-zero."""


class CrossPTError(Exception):
    """Base class: anything the user can fix by changing their input."""


class ConfigError(CrossPTError):
    """A config or search-space file is malformed, has an unknown key, a wrong type or an impossible value."""


class UnknownTaskError(CrossPTError):
    """A task name is not in the registry."""


class UnknownBackboneError(CrossPTError):
    """A backbone id/path cannot be resolved or its family is unsupported."""


class DataError(CrossPTError):
    """Data files are missing, malformed, lack a column, or cannot satisfy the sampling request."""


class ArtifactError(CrossPTError):
    """A saved prompt/bank/model artifact is missing or does not match the config."""


class SearchStateError(CrossPTError):
    """A search's saved state cannot be read, or another driver holds it: nothing is changed on its account."""


class ClusterError(CrossPTError):
    """This process is connected to a Ray cluster other than the one it was given."""


def first_in_chain(exc: BaseException, kinds: type | tuple[type, ...]) -> BaseException | None:
    """The first exception of `kinds` in `exc` or in what it wraps: its cause and context, a Ray task or
    actor error's `cause`, an exception group's members, a Ray Train worker group's `worker_failures`.
    Errors raised inside Ray workers reach the driver wrapped in one or more of these."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kinds):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        stack += list(getattr(e, "exceptions", []) or [])
        stack += list((getattr(e, "worker_failures", None) or {}).values())
    return None
