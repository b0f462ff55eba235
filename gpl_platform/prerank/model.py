"""The pre-ranker: a small MLP over the Feast feature matrix, with two-tower-style embedding projections.

Input is the float32 matrix of ``gpl_platform.features.serving.feature_matrix`` (the same function
serves training and online scoring). Scalars get a signed log1p and a standardization fitted on
the training rows; the user history embedding and the item content embedding are each projected
to a small space (the "towers") and their elementwise product joins the scalars in a 2-layer MLP.
Why not a pure two-tower: at this scale the cross features (ui_cosine, user x item counts) carry
much of the signal and a tiny MLP over them costs nothing at serving time (1,000 candidates are
one (1000 x ~800) matmul). Why not a large model: a pre-ranker must stay light.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

USER_EMBEDDING = "u_history_emb"
ITEM_EMBEDDING = "i_content_emb"


@dataclass
class ModelConfig:
    tower_dim: int = 32
    hidden: tuple[int, ...] = (64, 32)
    dropout: float = 0.1


@dataclass
class InputLayout:
    """Which matrix columns are scalars and which belong to each embedding, plus scaling stats."""

    columns: list[str]
    scalar_idx: list[int]
    user_emb_idx: list[int]
    item_emb_idx: list[int]
    scalar_mean: list[float] = field(default_factory=list)
    scalar_std: list[float] = field(default_factory=list)

    @classmethod
    def from_columns(cls, columns: list[str]) -> "InputLayout":
        user = [k for k, c in enumerate(columns) if c.startswith(USER_EMBEDDING + "[")]
        item = [k for k, c in enumerate(columns) if c.startswith(ITEM_EMBEDDING + "[")]
        taken = set(user) | set(item)
        scalars = [k for k in range(len(columns)) if k not in taken]
        return cls(list(columns), scalars, user, item)

    def fit_scaling(self, matrix: np.ndarray) -> "InputLayout":
        scalars = _signed_log1p(matrix[:, self.scalar_idx])
        self.scalar_mean = scalars.mean(axis=0).astype(float).tolist()
        self.scalar_std = np.maximum(scalars.std(axis=0), 1e-6).astype(float).tolist()
        return self

    def check(self, columns: list[str]) -> None:
        if list(columns) != self.columns:
            missing = sorted(set(self.columns) - set(columns))[:5]
            extra = sorted(set(columns) - set(self.columns))[:5]
            raise ValueError(f"feature columns differ from the model's (missing {missing}, extra {extra}): "
                             "score with the feature service the model was trained on")


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class PreRanker(nn.Module):
    def __init__(self, layout: InputLayout, config: ModelConfig | None = None):
        super().__init__()
        self.layout, self.config = layout, config or ModelConfig()
        c = self.config
        self.register_buffer("mean", torch.tensor(layout.scalar_mean or [0.0] * len(layout.scalar_idx)))
        self.register_buffer("std", torch.tensor(layout.scalar_std or [1.0] * len(layout.scalar_idx)))
        self.register_buffer("scalar_idx", torch.tensor(layout.scalar_idx, dtype=torch.long))
        self.register_buffer("user_idx", torch.tensor(layout.user_emb_idx, dtype=torch.long))
        self.register_buffer("item_idx", torch.tensor(layout.item_emb_idx, dtype=torch.long))
        self.user_tower = nn.Linear(len(layout.user_emb_idx), c.tower_dim) if layout.user_emb_idx else None
        self.item_tower = nn.Linear(len(layout.item_emb_idx), c.tower_dim) if layout.item_emb_idx else None
        width = len(layout.scalar_idx) + (c.tower_dim * 3 if self.user_tower and self.item_tower else
                                          c.tower_dim * (bool(self.user_tower) + bool(self.item_tower)))
        layers: list[nn.Module] = []
        for size in c.hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(c.dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, shape (n,)."""
        scalars = x.index_select(1, self.scalar_idx)
        parts = [(torch.sign(scalars) * torch.log1p(scalars.abs()) - self.mean) / self.std]
        u = self.user_tower(x.index_select(1, self.user_idx)) if self.user_tower is not None else None
        i = self.item_tower(x.index_select(1, self.item_idx)) if self.item_tower is not None else None
        parts += [t for t in (u, i) if t is not None]
        if u is not None and i is not None:
            parts.append(u * i)
        return self.mlp(torch.cat(parts, dim=1)).squeeze(1)

    @torch.no_grad()
    def predict(self, matrix: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Click probabilities for a feature matrix (eval mode, no gradient)."""
        self.eval()
        out = [torch.sigmoid(self(torch.from_numpy(np.ascontiguousarray(matrix[k:k + batch_size],
                                                                         dtype=np.float32))))
               for k in range(0, len(matrix), batch_size)]
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, directory: Path, lineage: dict) -> Path:
        """``model.pt`` (weights) and ``model.json`` (layout, config, lineage) in ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "model.pt.tmp"
        torch.save(self.state_dict(), tmp)
        meta = {"layout": asdict(self.layout), "config": asdict(self.config), "lineage": lineage}
        (directory / "model.json.tmp").write_text(json.dumps(meta, indent=2, default=str))
        tmp.replace(directory / "model.pt")
        (directory / "model.json.tmp").replace(directory / "model.json")
        return directory

    @classmethod
    def load(cls, directory: Path) -> tuple["PreRanker", dict]:
        directory = Path(directory)
        meta = json.loads((directory / "model.json").read_text())
        config = meta["config"]
        config["hidden"] = tuple(config["hidden"])
        model = cls(InputLayout(**meta["layout"]), ModelConfig(**config))
        model.load_state_dict(torch.load(directory / "model.pt", weights_only=True))
        model.eval()
        return model, meta["lineage"]
