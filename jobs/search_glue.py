"""The main job: a CrossPT design-factor search.

    ray job submit --working-dir . -- python jobs/search_glue.py --space search_spaces/glue_fewshot.yaml
    python jobs/search_glue.py --space search_spaces/smoke.yaml      # starts a local Ray

Under `ray job submit` RAY_ADDRESS is set and the job joins that cluster; otherwise a local Ray starts.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout, also on a cluster node

from crosspt.cli.main import run_cli
from crosspt.cli.search import add_search_flags, cmd_search

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_search_flags(parser)
    sys.exit(run_cli(cmd_search, parser.parse_args()))
