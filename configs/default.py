"""Defaults shared by every experiment config; experiment files override fields.

Not a runnable recipe on its own: start from `configs/quickstart.py` or one of
the paper configs. Every field here exists in every config, so a misspelt
`--config.a.b=value` override fails at start (the config is locked).
"""

import ml_collections

from consistency_jax import methods


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Method: its name and its own fields, with their defaults and comments in
    # consistency_jax/methods/<name>.py. A config for another method replaces
    # this with methods.method_config('<name>').
    config.method = methods.method_config("ict")

    # Parametrization: the consistency boundary condition f(x, sigma_min) = x.
    config.parametrization = param = ml_collections.ConfigDict()
    param.sigma_min = 0.002
    param.sigma_max = 80.0
    param.sigma_data = 0.5
    param.rho = 7.0
    # c_noise(sigma): 'edm' ln(s)/4 (EDM, ECT, iCT), 'cm' 1000 ln(s)/4 (original
    # CM code), 'raw' s (ACT).
    param.c_noise = "edm"

    # Model: `name` picks the network from the registry; the other fields are
    # the network's own (see consistency_jax/models/).
    config.model = ml_collections.ConfigDict()
    config.model.name = "ncsnpp"

    # Data.
    config.data = data = ml_collections.ConfigDict()
    data.name = "digits"
    data.image_size = 8
    data.num_channels = 1
    data.num_classes = 0  # > 0: class-conditional training with this many classes
    data.random_flip = False
    data.data_dir = ml_collections.FieldReference(None, field_type=str)
    data.path = ml_collections.FieldReference(None, field_type=str)  # image folder or .npz
    data.on_bad_image = "error"  # custom folders: 'error' stops, 'skip' skips and counts

    # Optimizer.
    config.optimizer = opt = ml_collections.ConfigDict()
    opt.name = "radam"  # 'adam', 'radam', 'adamw'
    opt.learning_rate = 1e-4
    opt.b1 = 0.9
    opt.b2 = 0.999
    opt.eps = 1e-8
    opt.weight_decay = 0.0
    opt.warmup_steps = 0  # linear warm-up from 0
    opt.lr_schedule = "constant"  # 'constant', 'cosine', 'rsqrt' (ECT ImageNet)
    opt.rsqrt_ref_steps = 2000  # 'rsqrt': lr / sqrt(max(step / ref, 1))
    opt.grad_clip_norm = 0.0  # 0: off

    # Training loop.
    config.training = train = ml_collections.ConfigDict()
    train.batch_size = 64  # global batch, over all devices and hosts
    train.num_steps = 1000
    train.ema_rates = (0.999,)  # evaluation EMAs kept in the train state
    # Power-function EMAs (EDM2, consistency_jax/phema.py), one per relative width sigma_rel in (0, 0.2887);
    # kept after the ema_rates ones. Two or more allow post-hoc reconstruction of other widths.
    train.ema_sigma_rels = ()
    train.log_every = 100
    train.sample_every = 1000  # PNG sample grid into the workdir; 0: off
    train.checkpoint_every = 1000
    train.keep_checkpoints = 3
    train.keep_every = 0  # > 0: also keep every checkpoint at a multiple of this step

    # Sampling (periodic grids and --mode=sample).
    config.sampling = sampling = ml_collections.ConfigDict()
    sampling.num_samples = 64
    sampling.batch_size = 256
    sampling.num_steps = 1  # 1: one step from sigma_max; 2: through mid_sigma
    sampling.mid_sigma = 0.821  # intermediate sigma of 2-step sampling (iCT CIFAR-10)
    sampling.sigmas = ()  # intermediate sigmas (descending) for samplers of 3 or more steps
    sampling.ema_rate = -1.0  # which EMA to sample from; -1: the first; 0: raw params
    # Clamp every denoised output of the consistency sampler to [-1, 1] before
    # re-noising it and before returning it, as the CM PyTorch code's
    # karras_sample (clip_denoised=True) does.
    sampling.clip_denoised = True
    sampling.ema_sigma_rel = 0.0  # > 0: sample from the power-function EMA of this sigma_rel instead
    # False: compile the samplers without XLA's optimisation passes (CPU only), for runs that sample a few hundred
    # images (the digits quickstarts): their samplers compile in a third of the time and run ~2.5x slower.
    sampling.xla_optimizations = True

    # Evaluation (end of training and --mode=eval).
    config.eval = ev = ml_collections.ConfigDict()
    ev.feature_extractor = "digits"  # 'digits' or 'inception'
    ev.num_samples = 1000
    ev.every_steps = 0  # periodic evaluation during training; 0: off
    ev.at_end = True  # evaluate (with the real and untrained baselines) when training finishes
    ev.steps = (1, 2)  # sampler step counts to evaluate
    # What samples are compared with: 'train' (the training set's statistics),
    # or the path of an ADM reference batch .npz (Inception statistics and
    # images, e.g. VIRTUAL_imagenet64_labeled.npz), which the ImageNet papers use.
    ev.reference = "train"
    # Inception weights: a directory or file; None: ~/.cache/consistency_jax (see README).
    ev.inception_dir = ml_collections.FieldReference(None, field_type=str)

    # Zero-shot editing with a consistency model (--mode=edit; consistency_jax/evaluation/edit.py).
    config.edit = edit = ml_collections.ConfigDict()
    edit.task = "inpaint"  # 'inpaint', 'colorize', 'superres', 'stroke'
    # A PNG, or an .npz with uint8 'images' [N, H, W(, C)] (optional 'masks', int 'labels'); results go beside it.
    edit.images = ml_collections.FieldReference(None, field_type=str)
    edit.masks = ml_collections.FieldReference(None, field_type=str)  # inpaint: PNG / .npz 'masks'; white = fill
    edit.steps = 4  # noise levels: a Karras grid from sigma_start down
    edit.sigma_start = -1.0  # first noise level; -1: sigma_max (stroke: 10)
    edit.label = -1  # class-conditional models, when the .npz has no 'labels': this class

    # Device mesh: axis sizes, -1 = all remaining devices.
    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1
    mesh.fsdp = 1
    # Arrays with fewer elements stay replicated under FSDP: splitting them
    # saves little memory and costs a collective each.
    mesh.fsdp_min_size = 2**14
    # CPU runs only: split the host into this many devices (one per core runs
    # the batch's shares in parallel: parallel.use_cpu_devices); 0 = XLA's one.
    mesh.cpu_devices = 0
    return config
