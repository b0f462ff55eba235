"""`python -m gpl_platform.features paths|serve`: where the rendered Feast repo is, and feast serve on 127.0.0.1.

    python -m gpl_platform.features paths                 # JSON of the paths
    python -m gpl_platform.features paths --feast-dir     # the value for GPL_FEAST_DIR
    python -m gpl_platform.features serve --port 6566     # feast -c <data_dir>/feast/repo serve -h 127.0.0.1
"""

import argparse
import json
import os
import sys

from gpl_platform.config import load_settings
from gpl_platform.features.store import FeastStore, feast_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpl_platform.features")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_paths = sub.add_parser("paths")
    p_paths.add_argument("--feast-dir", action="store_true")
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, default=6566)
    p_serve.add_argument("--redis-url", default=None)
    args = parser.parse_args(argv)
    settings = load_settings()
    store = FeastStore(settings, getattr(args, "redis_url", None))
    if args.cmd == "paths":
        if args.feast_dir:
            print(feast_dir(settings))
        else:
            print(json.dumps({"feast_dir": str(feast_dir(settings)), "repo_dir": str(store.write_repo()),
                              "sources_dir": str(store.sources_dir)}, indent=2))
        return 0
    repo = store.write_repo()
    feast = os.path.join(os.path.dirname(sys.executable), "feast")
    os.execv(feast, [feast, "-c", str(repo), "serve", "-h", "127.0.0.1", "-p", str(args.port)])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
