"""`python -m gpl_platform.features paths|serve`: where the feature store lives, and Feast's feature server on
127.0.0.1.

    python -m gpl_platform.features paths                 # JSON of the paths
    python -m gpl_platform.features paths --config        # the rendered feature_store.yaml (for feast -f)
    python -m gpl_platform.features serve --port 6566     # feast serve's app, malformed entity requests refused

The online store and registry are the settings' (GPL_FEATURE_STORE__ONLINE_STORE=redis ...).
"""

import argparse
import json

from gpl_platform.config import load_settings
from gpl_platform.features.feature_server import serve
from gpl_platform.features.repo import REPO_DIR
from gpl_platform.features.store import FeastStore, feast_dir


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpl_platform.features")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_paths = sub.add_parser("paths")
    p_paths.add_argument("--config", action="store_true", help="print only the rendered feature_store.yaml path")
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--port", type=int, default=6566)
    p_serve.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    settings = load_settings()
    store = FeastStore(settings)
    config = store.write_config()
    if args.cmd == "paths":
        if args.config:
            print(config)
        else:
            print(
                json.dumps(
                    {
                        "feast_dir": str(feast_dir(settings)),
                        "config": str(config),
                        "repo": str(REPO_DIR),
                        "sources_dir": str(store.sources_dir),
                        "online_store": store.online_store_type,
                    },
                    indent=2,
                )
            )
        return 0
    serve(args.port, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
