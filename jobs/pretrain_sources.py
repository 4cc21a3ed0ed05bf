"""Source-prompt pre-training as a Ray job: one vanilla prompt per source task, trained in parallel as
Ray tasks, saved as a bank, logged to MLflow and registered (default `models:/glue-sources@current`).

    ray job submit --working-dir . -- python jobs/pretrain_sources.py --config cfg.yaml --tasks sst2,rte,mrpc
    python jobs/pretrain_sources.py --tasks sst2,rte --backbone minilm        # starts a local Ray

Same flags as `crosspt pretrain-sources`. Under `ray job submit` RAY_ADDRESS is set and the job joins
that cluster; otherwise a local Ray starts.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, also on a cluster node

from crosspt.cli.main import run_cli
from crosspt.cli.registry import add_pretrain_flags, cmd_pretrain_sources

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pretrain_flags(parser)
    sys.exit(run_cli(cmd_pretrain_sources, parser.parse_args()))
