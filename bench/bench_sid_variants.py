"""Pseudo-label AUC of SID-anchor variants (settings overrides) next to the default, on the warehouse's
data (MovieLens-100K after `make demo`). Each variant trains the generators it needs (stored, so a
second run only decodes) and goes through the same scoring as `gpl bench pseudo-labels`.

    python bench/bench_sid_variants.py --out reports/sid_variants.json \\
        '{"sid": {"generator": {"shuffle_within_day": true}}}' '{"sid": {"generator": {"popular_subsample_t": 0}}}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _timing import write_json  # noqa: E402

from gpl_platform.config import load_settings  # noqa: E402
from gpl_platform.data.warehouse import Warehouse  # noqa: E402
from gpl_platform.evaluation.pseudo_label_quality import pseudo_label_quality  # noqa: E402
from gpl_platform.pseudo_labels.model_loading import anchor_generator, sentence_encoder  # noqa: E402


def run(variants: list[str], out=None) -> dict:
    settings = load_settings()
    warehouse = Warehouse.for_settings(settings)
    days = sorted(warehouse.written_days("user_histories"))
    generators = {"default": anchor_generator(settings, "sid")}
    for n, text in enumerate(variants):
        generators[f"variant{n}"] = anchor_generator(load_settings(json.loads(text)), "sid")
    report = pseudo_label_quality(
        warehouse,
        days,
        generators,
        sentence_encoder(str(settings.encoder_dir) if settings.encoder_dir else None),
        settings.anchors.k,
        settings.anchors.history_max_items,
        settings.seed,
        settings.source,
        progress=False,
    )
    result = {
        "benchmark": "sid_variants",
        "variants": {"default": "{}", **{f"variant{n}": v for n, v in enumerate(variants)}},
        "auc": report["auc"],
        "auc_users_with_history": report["auc_users_with_history"],
        "gauc_users_with_history": report["gauc_users_with_history"],
    }
    write_json(result, out)
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help="settings overrides as JSON, one per variant")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    print(json.dumps(run(args.variants, args.out), indent=2))
