"""Arguments of `selagg-fast probe`, mapped one to one onto ProbeConfig."""
from __future__ import annotations

import argparse
import json

from .seeds import parse_seeds
from .trainer import PROTOCOLS, ProbeConfig, saved_run_config


def json_object(text: str) -> dict:
    """argparse type of --model-kwargs: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"img_size\": 448}}', got {text!r}")
    return value


def seed_list(text: str) -> list:
    """argparse type of --seeds: distinct non-negative integers."""
    try:
        return parse_seeds(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected distinct non-negative integers such as 0,1,2, got {text!r}") from None


def add_backbone_arguments(g, help_suffix: str = "") -> None:
    """--model / --checkpoint / --random-init / --allow-key-mismatch / --trust-checkpoint /
    --model-kwargs, shared by probe and analyze."""
    g.add_argument("--model", default="vit_base_patch16_224",
                   help="a preset of the paper's backbones (mae_vit_base_patch16, simmim_vit_base_patch16, "
                        "dinov2_vit_base_patch14_reg4, ...: selagg-fast models), which reads its family's official "
                        "file as released, or a timm ViT name")
    g.add_argument("--checkpoint", help="local weights: a preset's official file, or for a timm name a timm "
                                        ".pth/.safetensors, MAE ('model'), I-JEPA ('target_encoder'); nothing is "
                                        "downloaded (default: none, then --random-init is required)")
    g.add_argument("--checkpoint-key", help="the dict of --checkpoint the weights sit under, e.g. encoder for "
                                            "I-JEPA's online encoder (default: the preset's layout: target_encoder, "
                                            "model, model_state, state_dict, ...)")
    g.add_argument("--random-init", action="store_true", help="no weights: random init (only for testing)")
    g.add_argument("--allow-key-mismatch", action="store_true",
                   help="load a checkpoint despite missing/unexpected keys (never one that leaves more than half of "
                        "the backbone's parameters at their random init, nor a file of another family)")
    g.add_argument("--trust-checkpoint", action="store_true",
                   help="load a .pth checkpoint that pickles objects other than tensors, numbers, strings and "
                        "argparse.Namespace: RUNS ANY CODE THE FILE HOLDS, only for files you trust")
    g.add_argument("--model-kwargs", type=json_object, default={},
                   help='JSON object overriding the architecture\'s arguments (timm.create_model\'s; a preset\'s img_size, '
                        'embed_dim, depth, num_heads), e.g. \'{"img_size": 448}\'')


def add_dataset_argument(g) -> None:
    """--dataset, shared by probe, analyze and compare."""
    from ..datasets import DATASETS
    g.add_argument("--dataset", choices=list(DATASETS), default="imagefolder",
                   help="layout of --data: imagefolder (train/ and val/ class folders), cub200 (the "
                        "CUB_200_2011 folder itself), or torchvision's on-disk layout (--data is the root "
                        "torchvision's class takes, e.g. the folder holding cifar-100-python/); the training "
                        "and evaluation splits of each: docs/datasets.md")


def add_probe_arguments(p: argparse.ArgumentParser) -> None:
    d = ProbeConfig()
    g = p.add_argument_group("backbone")
    add_backbone_arguments(g)
    g.add_argument("--return-block", type=int,
                   help="probe the output of block N counted from 1 (the paper's reference code counts from 0: its "
                        "--return_block N is --return-block N+1; the paper probes SimMIM at block 8); default: the last")
    g.add_argument("--final-norm", action=argparse.BooleanOptionalAction, default=d.final_norm,
                   help="apply the ViT's last LayerNorm (the paper's reference code does not)")
    g.add_argument("--compile-backbone", action="store_true",
                   help="torch.compile the frozen backbone: compiles on the first batches, faster forwards after")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="the dataset's folder (see --dataset), or 'synthetic' (required; no default)")
    add_dataset_argument(g)
    g.add_argument("--train-list", help="file listing the training images to use (e.g. the ImageNet-1%% split); "
                                        "default: every image under train/")
    g.add_argument("--synthetic-train-size", type=int, default=d.synthetic_train_size,
                   help="training images of --data synthetic")
    g.add_argument("--synthetic-val-size", type=int, default=d.synthetic_val_size,
                   help="validation images of --data synthetic")
    g.add_argument("--synthetic-classes", type=int, default=d.synthetic_classes,
                   help="classes of --data synthetic (2 to 16)")
    g.add_argument("--augment", action=argparse.BooleanOptionalAction, default=d.augment,
                   help="RandomResizedCrop + flip for training")
    g.add_argument("--workers", type=int, default=d.workers, help="DataLoader workers per process")
    g.add_argument("--cache-features", metavar="DIR", help="extract tokens once to DIR (needs --no-augment); "
                                                            "default: no cache, the backbone runs every epoch")
    g.add_argument("--cache-dtype", choices=["bf16", "fp32"], default=d.cache_dtype, help="dtype of cached tokens")
    g.add_argument("--refresh-cache", action="store_true",
                   help="delete this run's stores under --cache-features and extract them again (a store that is "
                        "damaged, or whose images changed since extraction, is otherwise refused)")
    g = p.add_argument_group("heads and optimisation")
    g.add_argument("--heads", default=d.heads, help=(
        "comma list of cls, avg, selective[_mlp_tanh|_mlp_relu][_sa|_samap][_pe][_all][_k<K>] (the reference "
        "head's variants: 2-layer MLP scorer, self-attention on both or the map only, positional conditioning, "
        "prefix tokens pooled too, K branches; paper Table 4), ap<H>[_ln][_all] (attentive probe with H heads, "
        "token LayerNorm; Table 6), ep<Q>[_all] (efficient probing with Q queries), and the non-trainable aggregations of Table 5: cls_attn (mean [cls] "
        "attention of the probed block), cls_attn_min_entropy (its lowest-entropy head), center_attn (the central "
        "patch's attention), external_cls_attn (--selector-model's [cls] attention). Self-attention heads "
        "(selective_mlp_tanh_sa = SA-AbMILP) train with --optimizer sgd: the paper found them unstable under LARS"))
    g.add_argument("--lrs", default=d.lrs, help="base learning rates; each (head, lr) pair trains separately")
    g.add_argument("--optimizer", choices=["lars", "sgd"], default=d.optimizer,
                   help="lars: the linear-probe protocol; sgd: the low-shot / fine-grained protocol")
    g.add_argument("--protocol", choices=list(PROTOCOLS), default=d.protocol,
                   help="paper: the paper's reference code (default-initialised nn.Linear classifier, SGD momentum "
                        "0, last partial training batch dropped); mae: MAE's linear probe (trunc-normal 0.01 init, "
                        "SGD momentum 0.9, last batch kept). Default: paper for a new run, the run's own on --resume")
    g.add_argument("--epochs", type=int, default=d.epochs, help="training epochs")
    g.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help="linear lr warm-up, in epochs")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="per process")
    g.add_argument("--accum-iter", type=int, default=d.accum_iter, help="gradient accumulation steps per update")
    g.add_argument("--momentum", type=float, default=d.momentum,
                   help="default: 0.9 for LARS; for SGD the protocol's (paper 0, mae 0.9); on --resume the run's own")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"], default=d.precision,
                   help="auto: bf16 autocast on GPUs, fp32 on CPUs")
    g = p.add_argument_group("selector (the external_cls_attn head)")
    g.add_argument("--selector-model", help="a second frozen ViT (a preset or a timm name) whose last-block [cls] "
                                            "attention (heads averaged, not renormalised) weighs the probed tokens; "
                                            "same patch grid")
    g.add_argument("--selector-checkpoint", help="local weights of --selector-model (loaded as --checkpoint; "
                                                 "--trust-checkpoint and --allow-key-mismatch apply to both)")
    g.add_argument("--selector-checkpoint-key", help="the dict of --selector-checkpoint the weights sit under "
                                                     "(default: the preset's layout)")
    g.add_argument("--selector-random-init", action="store_true", help="random --selector-model (testing only)")
    g.add_argument("--selector-model-kwargs", type=json_object, default={},
                   help="JSON object overriding --selector-model's architecture arguments")
    g = p.add_argument_group("k-NN (DINO's weighted vote on the linear probe's representation)")
    g.add_argument("--knn", action=argparse.BooleanOptionalAction, default=d.knn,
                   help="also report weighted k-NN top-1/top-5 of [cls] (the patch mean without [cls]), raw and "
                        "after the backbone's final norm, for every --knn-k x --knn-temperatures in one pass; "
                        "features from --cache-features, else one validation-transform pass before training")
    g.add_argument("--knn-k", default=d.knn_k, help="comma list of neighbour counts")
    g.add_argument("--knn-temperatures", default=d.knn_temperatures, help="comma list of vote temperatures T "
                                                                          "(weight exp(similarity / T))")
    g.add_argument("--knn-memory-gb", type=float, default=d.knn_memory_gb,
                   help="working memory of one similarity block (chunk sizes follow from it)")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", default=d.output_dir, help="folder of the run's outputs")
    g.add_argument("--resume", action="store_true", help="continue the run in --output-dir")
    g.add_argument("--stop-after-epochs", type=int, help="stop after N epochs of this invocation (resume later); "
                                                         "default: run to --epochs")
    seeds = g.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=d.seed, help="seed of the heads, the data order and augmentation")
    seeds.add_argument("--seeds", type=seed_list, default=d.seeds, metavar="S0,S1,...",
                       help="train every (head, lr) pair once per seed (e.g. 0,1,2) and report each seed's top-1/top-5, "
                            "their mean and standard deviation, each head's best lr by the mean. From "
                            "--cache-features each seed reads the tokens in its own order; live, the seeds share "
                            "the first seed's batches and augmentation and differ in head initialisation")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default=d.device, help="auto: cuda when present")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")


# Settings of one invocation, never taken from the run being resumed: where and how this process
# runs, and what it is allowed to do (--trust-checkpoint and --refresh-cache are asked for each time).
_PER_INVOCATION = {"output_dir", "resume", "stop_after_epochs", "refresh_cache", "progress", "device", "workers",
                   "compile_backbone", "trust_checkpoint", "knn_memory_gb"}


def config_from_args(args) -> ProbeConfig:
    """The run's settings. With ``--resume``, a flag not on the command line takes the resumed run's
    value (its ``config.json``), so ``probe --resume --output-dir DIR`` continues DIR as it was started;
    a flag given anew is checked against the run as before (a different setting is refused)."""
    fields = ProbeConfig.__dataclass_fields__
    values = {k: v for k, v in vars(args).items() if k in fields}
    saved = saved_run_config(values["output_dir"]) if values.get("resume") and hasattr(args, "argv") else None
    if saved:
        given = _given_flags(args.argv)
        if given & {"seed", "seeds"}:  # either one given anew replaces the run's seed choice whole
            given |= {"seed", "seeds"}
        values.update({k: v for k, v in saved.items() if k in fields and k not in given and k not in _PER_INVOCATION})
    return ProbeConfig(**values)


def _given_flags(argv: list) -> set:
    """The ProbeConfig names of the probe flags on the command line ``argv`` (``probe ...``)."""
    parser = argparse.ArgumentParser(add_help=False)  # abbreviations as the real parser takes them
    add_probe_arguments(parser)
    for action in parser._actions:  # no defaults: only what was typed lands in the namespace
        action.default = argparse.SUPPRESS
    words = list(argv)
    if words and words[0] == "probe":
        words = words[1:]
    given, _ = parser.parse_known_args(words)
    return set(vars(given))
