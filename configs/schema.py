"""The one typed configuration schema of restok (OmegaConf structured dataclasses).

Every command loads `RestokConfig` from a YAML preset plus `key=value` overrides
(see configs.loading). Unknown keys and wrong types are rejected naming the valid choices.
Model configs live beside their models (models.tokenizer.config, models.generator.config) so
the model library stays importable without this package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from models.generator.config import GeneratorConfig
from models.generator.config import SamplingConfig as SamplerConfig
from models.losses.tokenizer_loss import TokenizerLossConfig
from models.tokenizer.config import TokenizerConfig

# Field metadata: a local path (or fsspec URL) that configs.loading makes absolute against the
# directory the command ran in, on the driver, before any Ray worker sees the config (issue 18).
PATH = {"path": True}

# The pipeline's stages in graph order: the one list (infra.stages adds their inputs and configs).
StageName = Literal["prep", "train_tokenizer", "extract_codes", "train_generator", "evaluate"]
STAGE_NAMES: tuple[str, ...] = get_args(StageName)
# tokenizer_train.compile (and bench/vs_official.py --compile)
CompileBackend = Literal["off", "inductor", "aot_eager"]


@dataclass
class SyntheticDataConfig:
    """The built-in class-conditional dataset (data_prep.synthetic): shape x colour x jitter."""

    num_classes: int = 10
    train_per_class: int = 200
    val_per_class: int = 20
    resolution: int = 32
    seed: int = 0


@dataclass
class DataConfig:
    source: Literal["synthetic", "imagenet_folder", "imagenet_tar"] = "synthetic"
    # Root of the ImageNet folder tree (train/<wnid>/*.JPEG, val/...) or directory holding
    # ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar.
    root: str = field(default="", metadata=PATH)
    val_labels_csv: str = field(
        default="", metadata=PATH
    )  # LOC_val_solution.csv for a flat val folder / the val tar
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    # Where shards go: any fsspec URL (shared between runs: each data config writes its own
    # <shards_url>/prep-<fingerprint>-<sample list hash>/); empty = <work_dir>/prep.
    shards_url: str = field(default="", metadata=PATH)
    samples_per_shard: int = 1000
    # None keeps the original JPEG bytes; an int re-encodes with the shorter side resized.
    resize: int | None = None
    jpeg_quality: int = 95
    prep_tasks: int = 2  # Ray tasks writing shards in parallel
    max_images_per_split: int | None = None  # cap for smoke runs
    image_size: int = 256  # training / evaluation resolution
    crop_scale_min: float = 0.8  # paper: random resized crop 0.8-1.0 + flip
    hflip: bool = True
    loader_workers: int = 2
    # Training sample shuffle buffer per DataLoader worker (after shard resampling); prep writes
    # shards of ~16 classes each (data_prep.prepare.CLASSES_PER_GROUP), README "Data at cluster scale".
    shuffle_buffer: int = 1000
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    warmup_steps: int = 5000
    min_lr: float = 1e-5  # cosine floor
    grad_clip: float = 10.0


@dataclass
class TrainConfig:
    """Shared by the tokenizer and generator stages (different defaults per preset)."""

    steps: int = 1000
    global_batch_size: int = 256
    micro_batch_size: int = 32  # per worker; grad accumulation = global / (micro * workers)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema_decay: float = 0.9999
    # Release (ema_model.py): decay min(ema_decay, (1 + t) / (10 + t)), a copy at step 0; false =
    # ema_decay from the first step.
    ema_warmup: bool = False
    zero_stage: Literal[0, 1, 2, 3] = 1
    precision: Literal["bf16", "fp32"] = "bf16"  # fp16 is not supported on CPU
    log_every: int = 10
    image_log_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # newest complete checkpoints kept on storage (<= 0: all)
    resume: str = field(default="auto", metadata=PATH)  # auto | never | <checkpoint path>
    max_failures: int = 1
    seed: int = 0
    # Stop with a checkpoint after this many steps (0 = run all `steps`); a later run with
    # resume=auto continues the same schedule (how a run is split in two, e.g. for preemptible jobs).
    stop_after: int = 0


@dataclass
class TokenizerTrainConfig(TrainConfig):
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    disc_lr: float = 1e-4
    # torch.compile the pixel encoder and decoder (ResTok.compile_pixel_cnns), where eager PyTorch
    # spends its time in GroupNorm/SiLU/add passes: inductor fuses them (tiny tokenizer's CPU step
    # 1.28x, README "Speed"); the first step pays the compile (tiny: ~2 min cold, ~40 s cached).
    # aot_eager traces forward and backward without generating kernels: checks that the model
    # compiles, no speed-up. Same results to float rounding; not with zero_stage 3.
    compile: CompileBackend = "off"


@dataclass
class ExtractConfig:
    """Code extraction (SPEC "codes": LlamaGen-style augmentation)."""

    augment: Literal["none", "flip", "tencrop"] = "flip"  # tencrop: centre crop at 1.1x, then 5 crops + flips
    batch_size: int = 64
    num_actors: int = 2
    code_dtype: Literal["int16", "int32"] = "int16"  # int16 holds codebooks up to 32768 entries
    splits: list[str] = field(default_factory=lambda: ["train"])  # prep splits to tokenize
    use_ema: bool = True  # tokenize with the EMA weights (what evaluation uses)


@dataclass
class SamplingConfig(SamplerConfig):
    """The sampler's settings (models.generator.config.SamplingConfig: SPEC "sampling", published
    s = 3.75 step schedule from 0.25, top-p 0.95) plus how a sample set is drawn."""

    batch_size: int = 64
    seed: int = 0


@dataclass
class EvalConfig:
    recon: bool = True
    gen: bool = True
    num_samples_per_class: int = 50  # SPEC gFID: 50k samples, 50 per class
    keep_lengths: list[int] = field(default_factory=list)  # extra rFID at kept-token lengths
    num_actors: int = 2
    batch_size: int = 64
    # Feature network for FID/IS/precision/recall: inception (real metric) or probe (built-in
    # dataset stand-in, reported as FD-probe, never as FID).
    feature_net: Literal["inception", "probe"] = "inception"
    inception_weights: str = field(
        default="", metadata=PATH
    )  # local path; empty = normal download when online
    reference_stats: str = field(
        default="", metadata=PATH
    )  # .npz reference statistics for gFID (ADM VIRTUAL_imagenet256_labeled.npz)
    cfg_search_scales: list[float] = field(default_factory=list)
    cfg_search_start_ratios: list[float] = field(default_factory=list)
    # make-ref input: any shard dir / glob / comma list; empty = the prep split below.
    reference_shards: str = field(default="", metadata=PATH)
    reference_split: str = "train"  # ADM's reference batch is drawn from train
    reference_out: str = field(
        default="", metadata=PATH
    )  # make-ref output; empty = <evaluate dir>/reference-<net>-<split>.npz
    # Inception resize to 299 (jobs.metrics.inception): tf1 = the 2015 graph's TF1 bilinear and
    # (x-128)/128 (ADM evaluator, torch-fidelity as the release's rFID); pytorch_fid = torch bilinear.
    inception_resize: Literal["tf1", "pytorch_fid"] = "tf1"
    # GPUs per eval actor with cluster.use_gpu: one each; a fraction only to share on purpose.
    gpus_per_actor: float = 1.0
    lpips_vgg_weights: str = field(
        default="", metadata=PATH
    )  # torchvision vgg16-397923af.pth; empty = hub cache / download
    probe_steps: int = 300  # probe stand-in training steps (CPU: seconds at 32 px)
    probe_max_train_images: int = 20000
    grid_images: int = 8  # reconstruction / sample grid width
    samples_per_shard: int = 1000
    probe_cache: str = field(
        default="", metadata=PATH
    )  # where trained probes are kept; empty = <evaluate dir>/probe
    # `restok sweep`: checkpoint chains run at once (Ray tasks); 0 = 1 on a local Ray, all on a cluster.
    sweep_parallel: int = 0


@dataclass
class TrackingConfig:
    tracking_uri: str = field(default="", metadata=PATH)  # empty = sqlite:///<work_dir>/mlflow.db
    experiment: str = "restok"
    run_name: str = ""
    register_models: bool = True


@dataclass
class ClusterConfig:
    address: str = "local"  # local | auto | ray://host:10001
    num_workers: int = 2  # Ray Train workers per training stage
    use_gpu: bool = False
    cpus_per_worker: int = 1
    # Ray Train storage for checkpoints (any pyarrow/fsspec filesystem URL); empty = <work_dir>/ray.
    storage_path: str = field(default="", metadata=PATH)
    # Peak FLOP/s of one worker's device for MFU (e.g. 989 for an H100 in bf16); 0 = measure a
    # matmul once at start (a lower bound of the peak, so MFU is then an upper bound).
    peak_tflops_per_worker: float = 0.0
    # CPU Ray workers (Train workers, extraction and evaluation actors) keep freed memory in
    # glibc's heap (MALLOC_MMAP_THRESHOLD_ 256 MiB, MALLOC_TRIM_THRESHOLD_ 1 GiB) instead of
    # unmapping every large activation and faulting it in again next step: 8-12% of the 128 px
    # tiny tokenizer's step on 2 cores, nothing measurable at the default preset's 32 px (README
    # "Speed"). The price is memory held between steps. Workers with GPUs, or a driver with its
    # own MALLOC_* settings (passed on as they are), are left alone.
    cpu_worker_malloc_keep: bool = True


@dataclass
class RestokConfig:
    preset: str = "default"  # set by the loader; tags every MLflow run
    work_dir: str = field(default="restok_work", metadata=PATH)
    seed: int = 0
    stages: list[StageName] = field(default_factory=lambda: list(STAGE_NAMES))
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    tokenizer_train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    generator_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            # SPEC "HAR recipe": wd 0.05, clip 1.0, bf16.
            optim=OptimConfig(weight_decay=0.05, grad_clip=1.0)
        )
    )
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
