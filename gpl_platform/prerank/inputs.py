"""The pre-ranker's inputs: which feature-matrix columns are what, the dense inputs every shape reads,
and the id vocabularies of the id shapes (the shapes themselves: :mod:`gpl_platform.prerank.model`).

Input is the float32 matrix of ``gpl_platform.features.serving.feature_matrix`` (the same function
serves training and online scoring). Every shape reads it through :class:`DenseInputs`: scalars get
a signed log1p and a standardization fitted on the training rows (stored in the model); the user
history embedding and the item content embedding are each linearly projected to a small space.

Unknown ids: the feature contract gives an id the store does not have its defaults (zeros, and
``u_known``/``i_known`` 0), values the training rows never hold for a catalog id (``u_known`` is 1
in every row, so its training std is 0). :class:`DenseInputs` therefore replaces the inputs of an
unknown user or item (known flag 0) by the training rows' mean: its standardized scalars and
``ui_cosine`` become 0, its embedding the training rows' mean embedding (``InputLayout.*_emb_mean``).
An unknown item then scores like an average training candidate and an unknown user's candidates
are ranked by their item inputs. A scalar constant in training (std at the floor) enters as 0 whatever
its value: the model learned nothing about other values, and dividing by the floor made any other
value an input of about -7e5 that saturated the sigmoid. This runs inside the model, so training,
``predict`` and the scoring service apply it alike.

The id shapes carry :class:`IdVocabulary` objects: the item vocabulary is the whole catalog, so an
item that was never exposed still owns an embedding row, which only pseudo-labelled rows can
train. Row 0 is the out-of-vocabulary bucket: unknown ids score through it (a zero vector that
training never updates, :func:`id_embedding`) instead of failing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

USER_EMBEDDING = "u_history_emb"
ITEM_EMBEDDING = "i_content_emb"
USER_PREFIX, ITEM_PREFIX = "u_", "i_"
KNOWN_COLUMNS = {"user": "u_known", "item": "i_known"}  # 0: the feature store does not have the id
MIN_SCALAR_STD = 1e-6  # the std floor of the standardization
CONSTANT_SCALAR_STD = 1e-5  # a training std at or below this: the scalar was constant in training
ID_EMBEDDING_INIT_STD = 0.01  # small, so the row of an id no data has reached adds little to a score


@dataclass
class InputLayout:
    """Which matrix columns are scalars and which belong to each embedding, plus scaling stats."""

    columns: list[str]
    scalar_idx: list[int]
    user_emb_idx: list[int]
    item_emb_idx: list[int]
    scalar_mean: list[float] = field(default_factory=list)
    scalar_std: list[float] = field(default_factory=list)
    # the training rows' mean embeddings: an unknown user's history, an unknown item's content (empty
    # in a model.json from before them: those ids keep the contract's zeros)
    user_emb_mean: list[float] = field(default_factory=list)
    item_emb_mean: list[float] = field(default_factory=list)

    @classmethod
    def from_columns(cls, columns: list[str]) -> InputLayout:
        user = [k for k, c in enumerate(columns) if c.startswith(USER_EMBEDDING + "[")]
        item = [k for k, c in enumerate(columns) if c.startswith(ITEM_EMBEDDING + "[")]
        taken = set(user) | set(item)
        scalars = [k for k in range(len(columns)) if k not in taken]
        return cls(list(columns), scalars, user, item)

    def fit_scaling(self, matrix: np.ndarray) -> InputLayout:
        scalars = _signed_log1p(matrix[:, self.scalar_idx])
        self.scalar_mean = scalars.mean(axis=0).astype(float).tolist()
        self.scalar_std = np.maximum(scalars.std(axis=0), MIN_SCALAR_STD).astype(float).tolist()
        for entity, idx in (("user", self.user_emb_idx), ("item", self.item_emb_idx)):
            if idx:
                rows = matrix[self._known_rows(matrix, entity)][:, idx]
                setattr(self, f"{entity}_emb_mean", rows.mean(axis=0).astype(float).tolist())
        return self

    def _known_rows(self, matrix: np.ndarray, entity: str) -> np.ndarray:
        """Rows whose ``entity`` is known (all rows when the columns have no known flag, or none is 1)."""
        if KNOWN_COLUMNS[entity] not in self.columns:
            return np.ones(len(matrix), bool)
        known = matrix[:, self.columns.index(KNOWN_COLUMNS[entity])] != 0
        return known if known.any() else np.ones(len(matrix), bool)

    def scalar_entity(self, position: int) -> str | None:
        """``"user"``, ``"item"``, or None for a pair input (``ui_cosine``), of the scalar at ``position``."""
        name = self.columns[self.scalar_idx[position]]
        return "user" if name.startswith(USER_PREFIX) else "item" if name.startswith(ITEM_PREFIX) else None

    def scalar_positions(self, prefix: str) -> list[int]:
        """Positions among the scalars (not matrix columns) of the scalar columns named ``prefix*``."""
        return [p for p, k in enumerate(self.scalar_idx) if self.columns[k].startswith(prefix)]

    def check(self, columns: list[str]) -> None:
        if list(columns) != self.columns:
            missing = sorted(set(self.columns) - set(columns))[:5]
            extra = sorted(set(columns) - set(self.columns))[:5]
            raise ValueError(
                f"feature columns differ from the model's (missing {missing}, extra {extra}): "
                "score with the feature service the model was trained on"
            )


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


class IdVocabulary:
    """String ids -> embedding rows. Row 0 (:attr:`OOV_ROW`) is the bucket of every unknown id."""

    OOV_ROW = 0

    def __init__(self, ids: Sequence[str]):
        # sorted: the row of an id must not depend on the order a warehouse query returned the ids in
        self.ids: list[str] = sorted({str(i) for i in ids})
        self._index = pd.Index(self.ids)

    def __len__(self) -> int:
        """Embedding rows, the OOV bucket included."""
        return len(self.ids) + 1

    def rows(self, ids: Sequence[str]) -> np.ndarray:
        """int64 embedding rows of ``ids``; unknown ids get :attr:`OOV_ROW`."""
        keys = np.asarray(ids, dtype=object).astype(str)
        return (self._index.get_indexer(keys) + 1).astype(np.int64)  # get_indexer: -1 when unknown

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.ids).encode()).hexdigest()[:12]

    def unknown(self, ids: Sequence[str]) -> list[str]:
        """The distinct ids of ``ids`` that fall into the OOV bucket, in order of first appearance."""
        ids = list(dict.fromkeys(str(i) for i in ids))
        return [i for i, r in zip(ids, self.rows(ids)) if r == self.OOV_ROW]


def id_embedding(vocabulary: IdVocabulary, dim: int) -> nn.Embedding:
    # padding_idx: the OOV row starts at zero and gets no gradient, so an unknown id adds nothing
    embedding = nn.Embedding(len(vocabulary), dim, padding_idx=IdVocabulary.OOV_ROW)
    with torch.no_grad():
        nn.init.normal_(embedding.weight, std=ID_EMBEDDING_INIT_STD)
        embedding.weight[IdVocabulary.OOV_ROW].zero_()
    return embedding


class DenseInputs(nn.Module):
    """The feature matrix as model inputs, shared by every shape: standardized scalars and the two
    embedding projections; an unknown user's or item's inputs are the training mean (module docstring)."""

    def __init__(self, layout: InputLayout, projection_dim: int):
        super().__init__()
        self.register_buffer("scalar_mean", torch.tensor(layout.scalar_mean or [0.0] * len(layout.scalar_idx)))
        self.register_buffer("scalar_std", torch.tensor(layout.scalar_std or [1.0] * len(layout.scalar_idx)))
        self.register_buffer("scalar_idx", torch.tensor(layout.scalar_idx, dtype=torch.long))
        self.register_buffer("user_emb_idx", torch.tensor(layout.user_emb_idx, dtype=torch.long))
        self.register_buffer("item_emb_idx", torch.tensor(layout.item_emb_idx, dtype=torch.long))
        # unknown-id handling, all derived from model.json (not persistent: weights saved before it still load)
        entity = [layout.scalar_entity(p) for p in range(len(layout.scalar_idx))]
        self.flag_col = {  # entity -> the matrix column of its known flag
            name: layout.columns.index(column)
            for name, column in KNOWN_COLUMNS.items()
            if column in layout.columns and layout.columns.index(column) in layout.scalar_idx
        }
        positions = [layout.scalar_idx.index(col) for col in self.flag_col.values()]
        self.register_buffer("flag_positions", torch.tensor(positions, dtype=torch.long), persistent=False)
        # per flag, the scalars an unknown user (item) sets to the mean: its own and the pair's (ui_cosine)
        masks = torch.tensor([[e in (name, None) for e in entity] for name in self.flag_col], dtype=torch.bool)
        self.register_buffer("unknown_masks", masks.reshape(len(positions), len(entity)), persistent=False)
        means = {"user": layout.user_emb_mean, "item": layout.item_emb_mean}
        widths = {"user": len(layout.user_emb_idx), "item": len(layout.item_emb_idx)}
        for name in KNOWN_COLUMNS:
            fill = torch.tensor(means[name], dtype=torch.float32) if means[name] else torch.zeros(widths[name])
            self.register_buffer(f"{name}_emb_fill", fill, persistent=False)
        self.legacy_embedding_fill = [n for n in KNOWN_COLUMNS if widths[n] and not means[n]]
        self.n_scalars = len(layout.scalar_idx)
        self.projection_dim = projection_dim
        self.user_history_proj = nn.Linear(len(layout.user_emb_idx), projection_dim) if layout.user_emb_idx else None
        self.item_content_proj = nn.Linear(len(layout.item_emb_idx), projection_dim) if layout.item_emb_idx else None

    def scalars(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Signed log1p, then standardized; all scalars or those at ``positions`` among them."""
        z = self.standardize(x.index_select(1, self.scalar_idx))  # all of them: the known flags decide the fill
        return z if positions is None else z.index_select(1, positions)

    def standardize(self, raw: torch.Tensor) -> torch.Tensor:
        """:meth:`scalars` of raw scalar values already taken out of the matrix (all of them, in order)."""
        z = (torch.sign(raw) * torch.log1p(raw.abs()) - self.scalar_mean) / self.scalar_std
        z = z.masked_fill(self.scalar_std <= CONSTANT_SCALAR_STD, 0.0)  # constant in training
        if len(self.flag_positions):
            unknown = raw.index_select(1, self.flag_positions) == 0  # (n, flags)
            if unknown.any():  # the training mean: 0 once standardized
                z = z.masked_fill((unknown[:, :, None] & self.unknown_masks).any(dim=1), 0.0)
        return z

    def unknown(self, x: torch.Tensor, entity: str) -> torch.Tensor | None:
        """Rows of ``x`` whose user (item) is not in the feature store (known flag 0); None when there is
        none or the columns have no known flag."""
        if entity not in self.flag_col:
            return None
        unknown = x[:, self.flag_col[entity]] == 0
        return unknown if unknown.any() else None

    def _embedding(self, x: torch.Tensor, entity: str) -> torch.Tensor:
        """The entity's embedding columns of ``x``, the training mean in rows of an unknown id."""
        emb = x.index_select(1, getattr(self, f"{entity}_emb_idx"))
        unknown = self.unknown(x, entity)
        return emb if unknown is None else torch.where(unknown[:, None], getattr(self, f"{entity}_emb_fill"), emb)

    def user_history(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.user_history_proj(self._embedding(x, "user")) if self.user_history_proj is not None else None

    def item_content(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.item_content_proj(self._embedding(x, "item")) if self.item_content_proj is not None else None

    @property
    def width(self) -> int:
        """Width of :meth:`all_inputs`."""
        n_proj = (self.user_history_proj is not None) + (self.item_content_proj is not None)
        return self.n_scalars + self.projection_dim * (3 if n_proj == 2 else n_proj)

    def all_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every scalar, both projections and, when both exist, their elementwise product."""
        return self.assemble(self.scalars(x), self.user_history(x), self.item_content(x))

    @staticmethod
    def assemble(scalars: torch.Tensor, user: torch.Tensor | None, item: torch.Tensor | None) -> torch.Tensor:
        """:meth:`all_inputs` from its parts; a (1, d) user projection broadcasts over the rows (a server
        projects one user once and caches the items' projections)."""
        n = len(scalars)
        user = user.expand(n, -1) if user is not None and len(user) != n else user
        parts = [scalars] + [t for t in (user, item) if t is not None]
        if user is not None and item is not None:
            parts.append(user * item)
        return torch.cat(parts, dim=1)


# Weights saved before the shapes existed: the mlp's inputs (now :class:`DenseInputs`) sat at the top level
# of the module.
_LEGACY_KEY_PREFIXES = {
    "mean": "inputs.scalar_mean",
    "std": "inputs.scalar_std",
    "scalar_idx": "inputs.scalar_idx",
    "user_idx": "inputs.user_emb_idx",
    "item_idx": "inputs.item_emb_idx",
    "user_tower.": "inputs.user_history_proj.",
    "item_tower.": "inputs.item_content_proj.",
}


def rename_legacy_input_keys(state: dict) -> dict:
    """``state`` (an ``mlp`` state dict) with the keys of weights saved before the shapes renamed to
    their :class:`DenseInputs` names (``mean`` -> ``inputs.scalar_mean``...)."""
    out = {}
    for key, value in state.items():
        for old, new in _LEGACY_KEY_PREFIXES.items():
            if key == old or (old.endswith(".") and key.startswith(old)):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out
