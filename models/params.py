"""The BiCro parameters, declared once: defaults, constraints and what each one means.

`BiCroParams` is what fit_bicro and BiCroModel take and what a checkpoint's model.json stores; the pipeline's
`bicro:` config section (pipeline.config.BiCroConfig) is this model plus `fit_sample`. Defaults measured in
docs/bicro.md. Field order is part of the checkpoint format: model.json lists the params in declaration order.

Kept free of torch/faiss imports: the CLI and the config load this module before any model work starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from bicro_clean.models.cotrain import TrainConfig

# The anchor search kinds (models.anchors.ANCHOR_INDEX_KINDS is derived from this).
AnchorIndexKind = Literal["auto", "flat", "ivf", "pca"]

# Default anchor bank bound (anchor_top_k): 65,536 anchors are more than Flickr8k's whole clean set (so its
# evaluation is unchanged) and keep the checkpoint and the scoring indexes under ~600 MB whatever the crawl size.
ANCHOR_CAP = 65_536


class BiCroParams(BaseModel):
    """Everything one BiCro fit needs; the same values score pairs exactly as in training."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 0
    embed_dim: int = Field(512, gt=0)
    hidden_dim: int = Field(1024, ge=0, description="Residual MLP width of each head (0 = linear heads).")
    epochs: int = Field(8, gt=0, description="Total epochs, warm-up included.")
    warmup_epochs: int = Field(1, ge=0)
    # negatives come from the batch, so a batch needs at least 2 pairs
    batch_size: int = Field(128, gt=1)
    lr: float = Field(2e-4, gt=0)
    alpha: float = Field(0.2, gt=0, description="Triplet margin.")
    soft_margin_base: float = Field(10.0, gt=1, description="m in alpha*(m^y-1)/(m-1).")
    warmup_keep_ratio: float = Field(0.3, gt=0, le=1)
    division: Literal["bmm", "gmm"] = "bmm"
    clean_threshold: float = Field(0.5, ge=0, le=1, description="delta: p_clean above this is the clean set.")
    noisy_label_threshold: float = Field(0.5, ge=0, le=1, description="tau: noisy-set labels at or below are 0.")
    # anchor bank: the K most confident clean pairs (0 = the whole clean set). Bounded by default so an epoch's
    # anchor search costs the same per pair at 100k and at 10M pairs (fit time linear in pairs, docs/benchmarks.md)
    anchor_top_k: int = Field(
        ANCHOR_CAP, ge=0, description="Anchor bank: the K most confident clean pairs (0 = every clean pair). Bounded "
        "so the per-pair anchor search cost, the checkpoint and the scoring indexes do not grow with the crawl."
    )
    top_anchors: int = Field(1024, ge=-1, description="Most confident anchors whose soft label is 1 (-1 = all).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on head inputs and the MLP hidden layer.")
    lr_schedule: Literal["cosine", "constant", "step"] = "cosine"
    grad_clip: float = Field(2.0, ge=0, description="Gradient-norm clip (0 = off).")
    # fraction of the co-training epochs (after warm-up) after which noisy-set pairs join
    noisy_start: float = Field(0.5, ge=0, le=1, description="Fraction of co-training after which noisy pairs join.")
    drop_zero_labels: bool = Field(True, description="Noisy-set pairs whose label is 0 are left out of training.")
    # intra-modal cosines for consistency measured after removing the mean (models.consistency.consistency_space)
    center_consistency: bool = Field(True, description="Remove each space's mean before intra-modal cosines.")
    train_consistency_floor: float = Field(
        0.2, ge=0, le=1, description="Clean-set pairs (not top anchors) with consistency <= this are not trained on."
    )
    bank_size: int = Field(512, gt=1, description="Fixed negative bank for the per-pair division loss.")
    mixture_iterations: int = Field(10, gt=0, description="EM iterations of the loss mixture.")
    threads: int = Field(
        2, ge=0, description="torch/faiss threads in fit and score. Fixed, not 'all cores': float sums depend on "
        "the thread count, and outputs must be identical whichever machine or runner does the work. 0 = inherit."
    )
    # Anchor search in training's consistency labels and in scoring: "flat" = exact, "ivf" = faiss IndexIVFFlat,
    # approximate but ~A / (nlist + nprobe * A / nlist) times less work (docs/benchmarks.md measures the cost);
    # "pca" = candidates from a 96-d PCA projection of the bank (a flat scan, or an IVF index over the projected
    # rows from models.anchors.PCA_IVF_MIN_ROWS rows), re-ranked exactly (models.anchors.search_kind);
    # "auto" = on the CPU "pca" from models.anchors.AUTO_PCA_MIN_ROWS distinct anchor rows (where 96 directions
    # hold enough of the bank), exact below, IVF above AUTO_IVF_MIN_ROWS; on CUDA exact. Scoring and training alike.
    anchor_index: AnchorIndexKind = Field(
        "auto", description="Anchor search (consistency labels in training and scoring): flat = exact; ivf = faiss "
        "IndexIVFFlat, approximate and much faster at 100k anchors (docs/benchmarks.md measures its agreement); "
        "pca = candidates from a 96-d PCA projection (IVF over it from 4,096 rows) re-ranked exactly; auto = on the "
        "CPU pca from 2,048 distinct anchor rows (exact below, or where the projection holds little of the bank), "
        "IVF above 32,768; on CUDA exact. The same in training's consistency labels and in scoring."
    )
    ivf_nlist: int = Field(0, ge=0, description="IVF inverted lists (0 = about 2 * sqrt(distinct anchor rows)).")
    ivf_nprobe: int = Field(8, ge=1, description="IVF lists visited per query: more = closer to exact, slower.")
    # clean_score is calibrated on evidence from networks that never trained on the pair (models/calibration.py):
    # K fold models, each trained on the other folds of the fit pairs (docs/bicro.md#clean_score measures K).
    calibration_folds: int = Field(
        5, ge=0, description="Fold models that cross-fit clean_score's calibration (each trained on the other folds; "
        "the fit then trains 1 + K models, each fold model on (K-1)/K of the pairs). 0 = calibrate on the pairs the "
        "networks trained on (over-confident on small crawls). Unused when the crawl is at least twice the fit "
        "sample: pairs outside the sample calibrate it then."
    )

    # two more clean_score evidence columns (models/margins.py): resolved once at fit time and stored resolved in
    # the checkpoint (clean_score has one weight per evidence column), so scoring follows the fit on any device
    anchor_margins: Literal["auto", "on", "off"] = Field(
        "auto", description="Anchor margins in clean_score's evidence: each pair's cosine minus its best anchor "
        "caption (image side) and best anchor image (caption side). auto = on when the fit runs on CUDA, off on the "
        "CPU (two more anchor searches per pair: docs/bicro.md#anchor-margins measures cost and gain). The fit "
        "records its choice; scoring a checkpoint uses it on any device."
    )

    @model_validator(mode="after")
    def _cross_field_checks(self) -> "BiCroParams":
        """Checks across fields (single-field bounds are the Field constraints above)."""
        if self.warmup_epochs > self.epochs:
            raise ValueError("warmup_epochs must not exceed epochs")
        if self.calibration_folds == 1:
            raise ValueError("calibration_folds: 1 fold cannot cross-fit: 0 (off) or at least 2")
        return self

    def revalidate(self) -> None:
        """Re-run every check: model_copy(update=...) and model_construct skip validation, fit_bicro must not."""
        type(self).model_validate(self.model_dump())

    def train_config(self) -> "TrainConfig":
        """The subset the co-trainer needs (models.cotrain stays free of BiCro-specific parameters)."""
        from bicro_clean.models.cotrain import TrainConfig  # lazy: keeps this module free of torch

        return TrainConfig(
            embed_dim=self.embed_dim,
            hidden_dim=self.hidden_dim,
            dropout=self.dropout,
            lr=self.lr,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            epochs=self.epochs,
            lr_schedule=self.lr_schedule,
            alpha=self.alpha,
            soft_margin_base=self.soft_margin_base,
            grad_clip=self.grad_clip,
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BiCroParams":
        """The BiCro fields of `d`; other keys (a config section's fit_sample, say) are ignored, not rejected."""
        return cls(**{k: v for k, v in d.items() if k in cls.model_fields})
