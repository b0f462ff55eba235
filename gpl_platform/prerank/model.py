"""The pre-ranker in three shapes over the Feast feature matrix: ``mlp``, ``two_tower`` and ``cold``.

Every shape reads the matrix through :class:`~gpl_platform.prerank.inputs.DenseInputs` (standardized
scalars, projected embeddings, the training mean for an unknown user or item) and the id shapes map
ids to embedding rows with :class:`~gpl_platform.prerank.inputs.IdVocabulary` (row 0: the
out-of-vocabulary bucket); both live in :mod:`gpl_platform.prerank.inputs`.

* ``mlp`` (default): the standardized scalars, both projections and their elementwise product in
  a 2-layer MLP. No per-id parameters. Why not a pure two-tower: at this scale the cross features
  (ui_cosine, user x item counts) carry much of the signal and a tiny MLP over them costs nothing
  at serving time (1,000 candidates are one (1000 x ~800) matmul). Why not a large model: a
  pre-ranker must stay light.
* ``two_tower``: a user tower (user-id embedding, ``u_*`` scalars, history projection) and an item
  tower (item-id embedding, ``i_*`` scalars, content projection), each a small MLP to a vector;
  logit = dot product + per-item bias + global bias. No cross features, so item vectors can be
  computed once (:meth:`TwoTowerPreRanker.item_vectors`) and reused for every request.
* ``cold`` (COLD-like): user-id and item-id embeddings, their elementwise product and the ``mlp``
  shape's dense inputs in one light MLP.

The vocabularies are saved beside the weights.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from gpl_platform.prerank.inputs import (
    ITEM_PREFIX,
    USER_PREFIX,
    DenseInputs,
    IdVocabulary,
    InputLayout,
    id_embedding,
    rename_legacy_input_keys,
)

log = logging.getLogger(__name__)
SHAPES = ("mlp", "two_tower", "cold")
VOCABULARY_FILE = "vocabulary.json"


@dataclass
class ModelConfig:
    tower_dim: int = 32  # size of each embedding projection
    hidden: tuple[int, ...] = (64, 32)  # MLP hidden sizes; two_tower: towers end in a hidden[-1] vector
    dropout: float = 0.1
    shape: str = "mlp"  # one of SHAPES
    id_dim: int = 16  # user-id and item-id embedding size (id shapes)


def _mlp(width: int, hidden: Sequence[int], out: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout per hidden size, then a linear layer to ``out``."""
    layers: list[nn.Module] = []
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, out))
    return nn.Sequential(*layers)


class PreRanker(nn.Module):
    """What every shape shares: inputs, vocabularies, ``predict``, persistence.

    Build one with :func:`build_preranker`; :meth:`load` restores a saved one of any shape.
    """

    shape: ClassVar[str]
    uses_ids: ClassVar[bool] = False
    #: buffers set by :meth:`fit_unknown_ids`; weights saved before them load with their unfitted values
    unknown_id_state: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        layout: InputLayout,
        config: ModelConfig | None = None,
        user_vocab: IdVocabulary | None = None,
        item_vocab: IdVocabulary | None = None,
    ):
        super().__init__()
        self.layout, self.config = layout, config or ModelConfig()
        if self.uses_ids and (user_vocab is None or item_vocab is None):
            raise ValueError(
                f"the {self.shape} pre-ranker needs user_vocab and item_vocab (all user ids and the whole item catalog)"
            )
        self.user_vocab, self.item_vocab = (user_vocab, item_vocab) if self.uses_ids else (None, None)
        self.inputs = DenseInputs(layout, self.config.tower_dim)
        if self.uses_ids:
            self.user_id_emb = id_embedding(self.user_vocab, self.config.id_dim)
            self.item_id_emb = id_embedding(self.item_vocab, self.config.id_dim)

    def forward(
        self, x: torch.Tensor, user_rows: torch.Tensor | None = None, item_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits, shape (n,). ``user_rows``/``item_rows``: vocabulary rows of each row's ids."""
        raise NotImplementedError

    def id_rows(
        self, n: int, user_ids: Sequence[str] | None, item_ids: Sequence[str] | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Vocabulary rows of ``n`` rows' ids (``None, None`` for a shape without ids)."""
        if not self.uses_ids:
            return None, None
        if user_ids is None or item_ids is None:
            raise ValueError(f"the {self.shape} pre-ranker scores by user and item id: pass user_ids and item_ids")
        _check_id_count(user_ids, n, "user")
        _check_id_count(item_ids, n, "item")
        return (torch.from_numpy(self.user_vocab.rows(user_ids)), torch.from_numpy(self.item_vocab.rows(item_ids)))

    def fit_unknown_ids(
        self, matrix: np.ndarray, user_rows: torch.Tensor | None, item_rows: torch.Tensor | None
    ) -> PreRanker:
        """What a shape keeps for unknown ids beyond the inputs' training means, from the training rows
        once training ended (``two_tower``: the towers' mean outputs; the others: nothing)."""
        return self

    def parameter_groups(self, weight_decay: float) -> list[dict]:
        """Adam groups: id embeddings without weight decay (decay would move rows no data has reached;
        with a zero gradient, plain Adam leaves them exactly as they are), the rest with it."""
        embedding = [p for m in self.modules() if isinstance(m, nn.Embedding) for p in m.parameters()]
        taken = {id(p) for p in embedding}
        groups = [{"params": [p for p in self.parameters() if id(p) not in taken], "weight_decay": weight_decay}]
        if embedding:
            groups.append({"params": embedding, "weight_decay": 0.0})
        return groups

    @torch.no_grad()
    def predict(
        self,
        matrix: np.ndarray,
        user_ids: Sequence[str] | None = None,
        item_ids: Sequence[str] | None = None,
        batch_size: int = 65536,
    ) -> np.ndarray:
        """Click probabilities for a feature matrix (eval mode, no gradient); the id shapes need the
        rows' user and item ids (unknown ids score through the OOV bucket)."""
        user_rows, item_rows = self.id_rows(len(matrix), user_ids, item_ids)
        return self.predict_rows(matrix, user_rows, item_rows, batch_size)

    @torch.no_grad()
    def predict_rows(
        self,
        matrix: np.ndarray,
        user_rows: torch.Tensor | None = None,
        item_rows: torch.Tensor | None = None,
        batch_size: int = 65536,
    ) -> np.ndarray:
        """:meth:`predict` with the ids' vocabulary rows already looked up (a server caches them)."""
        self.eval()
        out = []
        for k in range(0, len(matrix), batch_size):
            batch = slice(k, k + batch_size)
            x = torch.from_numpy(np.ascontiguousarray(matrix[batch], dtype=np.float32))
            ids = (user_rows[batch], item_rows[batch]) if self.uses_ids else (None, None)
            out.append(torch.sigmoid(self(x, *ids)))
        return torch.cat(out).numpy() if out else np.zeros(0, np.float32)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, directory: Path, lineage: dict) -> Path:
        """``model.pt`` (weights), ``model.json`` (layout, config with the shape, lineage) and, for the id
        shapes, ``vocabulary.json`` in ``directory``; ``model.json`` is replaced last."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        staged = {"model.pt": directory / "model.pt.tmp"}
        torch.save(self.state_dict(), staged["model.pt"])
        meta = {"layout": asdict(self.layout), "config": asdict(self.config), "lineage": lineage}
        if self.uses_ids:
            text = json.dumps({"user": self.user_vocab.ids, "item": self.item_vocab.ids})
            staged[VOCABULARY_FILE] = directory / f"{VOCABULARY_FILE}.tmp"
            staged[VOCABULARY_FILE].write_text(text)
            meta["vocabulary"] = {
                "file": VOCABULARY_FILE,
                "n_users": len(self.user_vocab.ids),
                "n_items": len(self.item_vocab.ids),
                "sha256": hashlib.sha256(text.encode()).hexdigest(),
            }
        staged["model.json"] = directory / "model.json.tmp"
        staged["model.json"].write_text(json.dumps(meta, indent=2, default=str))
        for name, tmp in staged.items():
            tmp.replace(directory / name)
        return directory

    @classmethod
    def load(cls, directory: Path) -> tuple[PreRanker, dict]:
        directory = Path(directory)
        meta = json.loads((directory / "model.json").read_text())
        config = meta["config"]
        config["hidden"] = tuple(config["hidden"])
        config = ModelConfig(**config)  # a model.json from before the shapes has none: mlp
        user_vocab = item_vocab = None
        if "vocabulary" in meta:
            text = (directory / meta["vocabulary"]["file"]).read_text()
            if hashlib.sha256(text.encode()).hexdigest() != meta["vocabulary"]["sha256"]:
                raise ValueError(f"{directory / meta['vocabulary']['file']} does not match model.json")
            ids = json.loads(text)
            user_vocab, item_vocab = IdVocabulary(ids["user"]), IdVocabulary(ids["item"])
        model = build_preranker(InputLayout(**meta["layout"]), config, user_vocab, item_vocab)
        state = torch.load(directory / "model.pt", weights_only=True)
        # only mlp weights can predate the shapes (and two_tower has real ``user_tower.*`` keys)
        state = rename_legacy_input_keys(state) if config.shape == "mlp" else state
        unfitted = [k for k in model.unknown_id_state if k not in state]
        state = {**{k: v for k, v in model.state_dict().items() if k in unfitted}, **state}
        model.load_state_dict(state)
        model.eval()
        if unfitted:
            log.warning(
                "%s predates the %s unknown-id vectors: an unknown id goes through the towers with the "
                "training mean inputs; retrain to store them",
                directory,
                model.shape,
            )
        if model.inputs.legacy_embedding_fill:
            log.warning(
                "%s predates the unknown-id embedding means: an unknown %s keeps the contract's zero "
                "embedding (its scalars still get the training mean); retrain to store the means",
                directory,
                " or ".join(model.inputs.legacy_embedding_fill),
            )
        return model, meta["lineage"]


def _known(unknown: torch.Tensor | None, n: int) -> torch.Tensor:
    return torch.ones(n, dtype=torch.bool) if unknown is None else ~unknown


def _check_id_count(ids: Sequence[str], n: int, kind: str) -> None:
    if len(ids) != n:
        raise ValueError(f"{len(ids)} {kind} ids for {n} feature rows")


class MlpPreRanker(PreRanker):
    """Standardized scalars + embedding projections (and their product) -> MLP. No per-id parameters."""

    shape = "mlp"

    def __init__(
        self,
        layout: InputLayout,
        config: ModelConfig | None = None,
        user_vocab: IdVocabulary | None = None,
        item_vocab: IdVocabulary | None = None,
    ):
        super().__init__(layout, config, user_vocab, item_vocab)
        c = self.config
        self.mlp = _mlp(self.inputs.width, c.hidden, 1, c.dropout)

    def forward(self, x, user_rows=None, item_rows=None):
        return self.logits(self.inputs.all_inputs(x))

    def logits(self, dense: torch.Tensor, user_rows=None, item_rows=None) -> torch.Tensor:
        """Logits from :meth:`DenseInputs.all_inputs` (or its :meth:`~DenseInputs.assemble`)."""
        return self.mlp(dense).squeeze(1)


@dataclass
class ItemVectors:
    """Item-side results of a two-tower model for a list of items, computed once per catalog state."""

    item_ids: list[str]
    vectors: np.ndarray  # float32 (n_items, d)
    logit_offset: np.ndarray  # float32 (n_items,): item bias + global bias


class TwoTowerPreRanker(PreRanker):
    """logit = <user tower, item tower> + item bias + global bias; no cross features.

    An unknown user (item) gets the mean user (item) vector and logit offset of the training rows
    (:meth:`fit_unknown_ids`), not the tower of the mean inputs: the towers are not linear, and in the
    test world the item tower of the mean inputs scored above every catalog item for a third of the
    users. So an unknown item's logit for a user is that user's mean logit over the training rows."""

    shape = "two_tower"
    uses_ids = True
    unknown_id_state = ("unknown_fitted", "unknown_user_vector", "unknown_item_vector", "unknown_item_offset")

    def __init__(
        self,
        layout: InputLayout,
        config: ModelConfig | None = None,
        user_vocab: IdVocabulary | None = None,
        item_vocab: IdVocabulary | None = None,
    ):
        super().__init__(layout, config, user_vocab, item_vocab)
        c = self.config
        if not c.hidden:
            raise ValueError("two_tower needs at least one hidden size: the towers end in a hidden[-1] vector")
        self.register_buffer("user_scalar_pos", torch.tensor(layout.scalar_positions(USER_PREFIX), dtype=torch.long))
        self.register_buffer("item_scalar_pos", torch.tensor(layout.scalar_positions(ITEM_PREFIX), dtype=torch.long))
        # zeros: an item without data (and the OOV bucket) starts from the global bias alone
        self.item_bias = nn.Embedding(len(self.item_vocab), 1, padding_idx=IdVocabulary.OOV_ROW)
        nn.init.zeros_(self.item_bias.weight)
        self.global_bias = nn.Parameter(torch.zeros(1))
        proj = c.tower_dim
        user_width = c.id_dim + len(self.user_scalar_pos) + (proj if self.inputs.user_history_proj is not None else 0)
        item_width = c.id_dim + len(self.item_scalar_pos) + (proj if self.inputs.item_content_proj is not None else 0)
        self.user_tower = _mlp(user_width, c.hidden[:-1], c.hidden[-1], c.dropout)
        self.item_tower = _mlp(item_width, c.hidden[:-1], c.hidden[-1], c.dropout)
        # until fitted (during training, or weights saved before them) unknown ids go through the towers
        self.register_buffer("unknown_fitted", torch.tensor(False))
        self.register_buffer("unknown_user_vector", torch.zeros(c.hidden[-1]))
        self.register_buffer("unknown_item_vector", torch.zeros(c.hidden[-1]))
        self.register_buffer("unknown_item_offset", torch.zeros(()))

    @torch.no_grad()
    def fit_unknown_ids(self, matrix, user_rows, item_rows, batch_size: int = 65536) -> TwoTowerPreRanker:
        """The mean user vector, item vector and item logit offset over the training rows of known ids."""
        self.eval()
        self.unknown_fitted.fill_(False)
        sums = {"user": 0.0, "item": 0.0, "offset": 0.0}
        counts = {"user": 0, "item": 0}
        for k in range(0, len(matrix), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(matrix[k : k + batch_size], dtype=np.float32))
            users = self.user_vectors(x, user_rows[k : k + batch_size])
            items, offset = self._item_side(x, item_rows[k : k + batch_size])
            known = {e: _known(self.inputs.unknown(x, e), len(x)) for e in ("user", "item")}
            sums["user"] = sums["user"] + users[known["user"]].sum(dim=0)
            sums["item"] = sums["item"] + items[known["item"]].sum(dim=0)
            sums["offset"] += float(offset[known["item"]].sum())
            counts["user"] += int(known["user"].sum())
            counts["item"] += int(known["item"].sum())
        if counts["user"]:
            self.unknown_user_vector.copy_(sums["user"] / counts["user"])
        if counts["item"]:
            self.unknown_item_vector.copy_(sums["item"] / counts["item"])
            self.unknown_item_offset.fill_(sums["offset"] / counts["item"])
        self.unknown_fitted.fill_(True)
        return self

    def _tower_inputs(self, ids: torch.Tensor, scalars: torch.Tensor, projection: torch.Tensor | None):
        return torch.cat([ids, scalars] + ([projection] if projection is not None else []), dim=1)

    def user_vectors(self, x: torch.Tensor, user_rows: torch.Tensor) -> torch.Tensor:
        vectors = self.user_tower(
            self._tower_inputs(
                self.user_id_emb(user_rows), self.inputs.scalars(x, self.user_scalar_pos), self.inputs.user_history(x)
            )
        )
        unknown = self.inputs.unknown(x, "user") if self.unknown_fitted else None
        return vectors if unknown is None else torch.where(unknown[:, None], self.unknown_user_vector, vectors)

    def _item_side(self, x: torch.Tensor, item_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Item vectors and logit offsets (item bias + global bias)."""
        vectors = self.item_tower(
            self._tower_inputs(
                self.item_id_emb(item_rows), self.inputs.scalars(x, self.item_scalar_pos), self.inputs.item_content(x)
            )
        )
        offset = self.item_bias(item_rows).squeeze(1) + self.global_bias
        unknown = self.inputs.unknown(x, "item") if self.unknown_fitted else None
        if unknown is not None:
            vectors = torch.where(unknown[:, None], self.unknown_item_vector, vectors)
            offset = torch.where(unknown, self.unknown_item_offset, offset)
        return vectors, offset

    def forward(self, x, user_rows=None, item_rows=None):
        users = self.user_vectors(x, user_rows)
        items, offset = self._item_side(x, item_rows)
        return (users * items).sum(dim=1) + offset

    @torch.no_grad()
    def item_vectors(self, matrix: np.ndarray, item_ids: Sequence[str]) -> ItemVectors:
        """Item vectors of ``item_ids``, once: row k of ``matrix`` holds item k's features (only the
        item-side columns are read, so any user's feature rows for those items will do)."""
        self.eval()
        _check_id_count(item_ids, len(matrix), "item")
        x = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        vectors, offset = self._item_side(x, torch.from_numpy(self.item_vocab.rows(item_ids)))
        return ItemVectors([str(i) for i in item_ids], vectors.numpy(), offset.numpy())

    @torch.no_grad()
    def predict_with_item_vectors(self, matrix: np.ndarray, user_ids: Sequence[str], items: ItemVectors) -> np.ndarray:
        """Click probabilities (n_users, n_items) of every user row of ``matrix`` (only its user-side
        columns are read) against precomputed item vectors: one matmul, no item tower."""
        self.eval()
        _check_id_count(user_ids, len(matrix), "user")
        x = torch.from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        users = self.user_vectors(x, torch.from_numpy(self.user_vocab.rows(user_ids)))
        logits = users @ torch.from_numpy(items.vectors).T + torch.from_numpy(items.logit_offset)
        return torch.sigmoid(logits).numpy()


class ColdPreRanker(PreRanker):
    """COLD-like: [user-id emb, item-id emb, their product, every dense input] -> light MLP."""

    shape = "cold"
    uses_ids = True

    def __init__(
        self,
        layout: InputLayout,
        config: ModelConfig | None = None,
        user_vocab: IdVocabulary | None = None,
        item_vocab: IdVocabulary | None = None,
    ):
        super().__init__(layout, config, user_vocab, item_vocab)
        c = self.config
        self.mlp = _mlp(3 * c.id_dim + self.inputs.width, c.hidden, 1, c.dropout)

    def forward(self, x, user_rows=None, item_rows=None):
        return self.logits(self.inputs.all_inputs(x), user_rows, item_rows)

    def logits(self, dense: torch.Tensor, user_rows: torch.Tensor, item_rows: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`DenseInputs.all_inputs` (or its :meth:`~DenseInputs.assemble`) and the id rows."""
        u, i = self.user_id_emb(user_rows), self.item_id_emb(item_rows)
        return self.mlp(torch.cat([u, i, u * i, dense], dim=1)).squeeze(1)


_SHAPE_CLASSES: dict[str, type[PreRanker]] = {
    "mlp": MlpPreRanker,
    "two_tower": TwoTowerPreRanker,
    "cold": ColdPreRanker,
}


def build_preranker(
    layout: InputLayout,
    config: ModelConfig | None = None,
    user_vocab: IdVocabulary | Sequence[str] | None = None,
    item_vocab: IdVocabulary | Sequence[str] | None = None,
) -> PreRanker:
    """A fresh pre-ranker of ``config.shape``; vocabularies (ids or :class:`IdVocabulary`) are
    needed by the id shapes and ignored by ``mlp``."""
    config = config or ModelConfig()
    if config.shape not in _SHAPE_CLASSES:
        raise ValueError(f"unknown pre-ranker shape {config.shape!r}; choose from {SHAPES}")

    def vocabulary(ids):
        return ids if ids is None or isinstance(ids, IdVocabulary) else IdVocabulary(ids)

    return _SHAPE_CLASSES[config.shape](layout, config, vocabulary(user_vocab), vocabulary(item_vocab))
