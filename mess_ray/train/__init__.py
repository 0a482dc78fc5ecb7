"""Training on Ray Train: HuBERT-style SSL pretraining and contrastive fine-tuning."""

from mess_ray.train.finetune import run_finetune
from mess_ray.train.pretrain import run_pretrain

__all__ = ["run_pretrain", "run_finetune"]
