"""GPL's pseudo-label weight lambda against exposed_only, same split, features and seeds, one run.

    python bench/bench_lambda_sweep.py --lambdas 0.1 0.3 1.0 --seeds 0 1 2 --out reports/lambda_sweep.json

Needs a warehouse the pipeline filled (make demo); reads the configured data_dir.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def run(lambdas: list[float], seeds: list[int], out: Path | None = None) -> dict:
    from gpl_platform.config import load_settings
    from gpl_platform.data.warehouse import Warehouse
    from gpl_platform.evaluation.offline import run_offline_evaluation
    from gpl_platform.features.store import FeastStore

    settings = load_settings()
    warehouse, store = Warehouse.for_settings(settings), FeastStore(settings)
    result: dict = {"dataset": settings.source, "seeds": seeds, "lambdas": {}}
    for lam in lambdas:
        cfg = settings.training.model_copy(update={"pseudo_weight": lam})
        methods = ["exposed_only", "gpl"] if lam == lambdas[0] else ["gpl"]
        report = run_offline_evaluation(
            warehouse,
            store,
            cfg,
            settings.source,
            methods=methods,
            seeds=seeds,
            label_gate=settings.quality.pseudo_labels,
        )
        if "exposed_only" in report["methods"]:
            result["exposed_only"] = report["methods"]["exposed_only"]
        result["lambdas"][str(lam)] = report["methods"]["gpl"]
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=2))
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.lambdas, args.seeds, args.out)
    for lam, metrics in result["lambdas"].items():
        print(
            f"lambda {lam}: auc {metrics['auc']['mean']:.4f} ± {metrics['auc']['std']:.4f}, "
            f"hr@10 {metrics['hr@10']['mean']:.4f}"
        )
    base = result["exposed_only"]
    print(f"exposed_only: auc {base['auc']['mean']:.4f} ± {base['auc']['std']:.4f}, hr@10 {base['hr@10']['mean']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
