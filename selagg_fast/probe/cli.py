"""Arguments of `selagg-fast probe`, mapped one to one onto ProbeConfig."""
from __future__ import annotations

import argparse
import json

from .trainer import ProbeConfig


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    d = ProbeConfig()
    g = p.add_argument_group("backbone")
    g.add_argument("--model", default=d.model, help="timm ViT name (default %(default)s)")
    g.add_argument("--checkpoint", help="local weights: MAE .pth ('model'), I-JEPA ('encoder'/'target_encoder'), "
                                        "timm .pth/.safetensors; nothing is downloaded")
    g.add_argument("--random-init", action="store_true", help="no weights: random init (only for testing)")
    g.add_argument("--allow-key-mismatch", action="store_true", help="load a checkpoint despite missing/unexpected keys")
    g.add_argument("--return-block", type=int, help="probe the output of block N (1-based; SimMIM: 8)")
    g.add_argument("--final-norm", action=argparse.BooleanOptionalAction, default=d.final_norm,
                   help="apply the ViT's last LayerNorm (default: no, as the paper's reference code)")
    g.add_argument("--model-kwargs", type=json.loads, default={},
                   help='JSON passed to timm.create_model, e.g. \'{"img_size": 448}\'')
    g.add_argument("--compile-backbone", action="store_true",
                   help="torch.compile the frozen backbone: compiles on the first batches, faster forwards after")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="ImageFolder root with train/ and val/, or 'synthetic'")
    g.add_argument("--train-list", help="file listing the training images to use (e.g. the ImageNet-1%% split)")
    g.add_argument("--synthetic-train-size", type=int, default=d.synthetic_train_size)
    g.add_argument("--synthetic-val-size", type=int, default=d.synthetic_val_size)
    g.add_argument("--synthetic-classes", type=int, default=d.synthetic_classes)
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="RandomResizedCrop + flip for training (default on)")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per process")
    g.add_argument("--cache-features", metavar="DIR", help="extract tokens once to DIR (needs --no-augment)")
    g.add_argument("--cache-dtype", choices=["bf16", "fp32"], default=d.cache_dtype)
    g = p.add_argument_group("heads and optimisation")
    g.add_argument("--heads", default=d.heads, help="comma list of cls, avg, selective, selective_all, selective_k<K>")
    g.add_argument("--lrs", default=d.lrs, help="base learning rates; each (head, lr) pair trains separately")
    g.add_argument("--optimizer", choices=["lars", "sgd"], default=d.optimizer)
    g.add_argument("--epochs", type=int, default=d.epochs)
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs)
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--accum-iter", type=int, default=d.accum_iter)
    g.add_argument("--momentum", type=float, default=d.momentum)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=d.output_dir)
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    g.add_argument("--stop-after-epochs", type=int, help="stop after N epochs of this invocation (resume later)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d.device)
    g.add_argument("--no-progress", dest="progress", action="store_false")


def config_from_args(args) -> ProbeConfig:
    fields = ProbeConfig.__dataclass_fields__
    return ProbeConfig(**{k: v for k, v in vars(args).items() if k in fields})
