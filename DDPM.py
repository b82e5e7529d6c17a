"""Gaussian diffusion for mask generation: forward noising and the DDPM / DDIM samplers.

Read beside
  Ho et al. 2020, "Denoising Diffusion Probabilistic Models"      (eqs. 4, 6, 7, 11, 15)
  Nichol & Dhariwal 2021, "Improved DDPM"                          (eq. 17, cosine schedule)
  Song et al. 2021, "Denoising Diffusion Implicit Models"          (eq. 12, strided sampling)
  Salimans & Ho 2022, "Progressive Distillation"                   (v-prediction)
  Chen et al. 2022, "Analog Bits"                                  (masks as bits)

Masks live in diffusion space [-1, 1]: a binary mask as one channel, x0 = 2 * mask - 1; a
label map of K > 2 classes as K one-hot channels or ceil(log2 K) analog bits (Chen et al.
2022), each 2 * bit - 1 (`encode_labels`, and `class_probabilities` back). The model sees
the noisy mask concatenated with the conditioning image, `model(*diffusion.model_args(x_t,
t, image))`, with `t` the integer timestep on the original 0..T-1 scale, and predicts eps,
x0 or v, or the logits of x0 ("x0_logits": x0 = 2 sigmoid(out) - 1, or 2 softmax(out) - 1
over one-hot channels, so the estimate is a probability and trains with cross-entropy).
With input_scaling="abar" the noisy mask reaches the network as sqrt(abar_t) x_t, and with
a time_floor every timestep whose abar_t is below it reaches the network as the same one
(`Diffusion.model_args`).

This file imports no other file of the project: a notebook that only samples needs it and
`model.py`, not the trainer.
"""
import math

import torch
from tqdm.auto import tqdm

PREDICTION_TYPES = ("eps", "x0", "v", "x0_logits")
SCHEDULES = ("cosine", "linear")
TIMESTEP_SAMPLING = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "min_snr")
REPRESENTATIONS = ("onehot", "bits")
INPUT_SCALINGS = ("none", "abar")
# the views of an image a mirrored ensemble's members see, in member order (flipped axes)
MIRROR_VIEWS = ((), (-1,), (-2,), (-2, -1))   # as is, left-right, up-down, both


# ------------------------------------------------------------------ noise schedules
def cosine_beta_schedule(timesteps, s=0.008, max_beta=0.999, shift=1.0):
    """Improved-DDPM eq. 17: abar(t) = cos^2(((t/T) + s) / (1 + s) * pi/2), normalised so
    abar(0) = 1, and beta_t = min(1 - abar(t+1)/abar(t), max_beta). Float64, shape (T,).

    max_beta stops the last step from being a certain jump to pure noise (beta = 1).
    shift: see shift_alphas_cumprod; 1 = the schedule as published.
    """
    steps = torch.arange(timesteps + 1, dtype=torch.float64)
    f = torch.cos(((steps / timesteps) + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = shift_alphas_cumprod(f / f[0], shift)
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def linear_beta_schedule(timesteps, beta_start=1e-4, beta_end=0.02, shift=1.0):
    """Ho et al.'s linear schedule, rescaled so any T gives the same overall noise as T=1000."""
    scale = 1000 / timesteps
    betas = torch.linspace(scale * beta_start, scale * beta_end, timesteps, dtype=torch.float64)
    if shift == 1:
        return betas
    alphas_cumprod = shift_alphas_cumprod(torch.cumprod(1 - betas, 0), shift)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    return 1 - alphas_cumprod / prev


def shift_alphas_cumprod(alphas_cumprod, shift):
    """Lower the log signal-to-noise ratio of every step by 2 ln(shift) (Hoogeboom et al.
    2023, "simple diffusion", shifted schedules; Chen 2023, "On the importance of noise
    scheduling", input scaling): SNR' = SNR / shift^2, i.e. abar' = abar / (abar + shift^2
    (1 - abar)). The ends stay put (abar' = 1 at abar = 1 and 0 at 0).

    Why: a mask is nearly all low frequency, so at a given abar a large mask keeps far more
    of its shape than a small natural image does, and with shift 1 most training steps can
    be solved by denoising the noisy mask alone, without looking at the image. shift > 1
    spends more of them at noise levels where the image is the only guide.
    """
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"schedule shift must be a finite number > 0, got {shift}")
    if shift == 1:
        return alphas_cumprod       # as published, bit for bit (no rounding through the formula)
    return alphas_cumprod / (alphas_cumprod + shift ** 2 * (1 - alphas_cumprod))


def get_beta_schedule(name, timesteps, shift=1.0):
    """The betas of a named schedule ("cosine" or "linear"), float64, shape (T,)."""
    if name == "cosine":
        return cosine_beta_schedule(timesteps, shift=shift)
    if name == "linear":
        return linear_beta_schedule(timesteps, shift=shift)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")


def model_input(x_t, image, x0_prev=None):
    """What the denoiser sees: the noisy mask, with self-conditioning the previous estimate
    of the clean mask, and the conditioning image, stacked on the channel axis:
    (B, M, H, W) [+ (B, M, H, W)] + (B, C, H, W). Diffusion.model_args, which training,
    validation and sampling all call, stacks the network's input with this."""
    parts = [x_t] if x0_prev is None else [x_t, x0_prev.to(x_t.dtype)]
    return torch.cat([*parts, image.to(x_t.dtype)], dim=1)


# ------------------------------------------------------------------ masks of K classes
def mask_channels(num_classes=2, representation="onehot"):
    """Channels a mask of `num_classes` classes (background included) takes in diffusion
    space: 1 for a binary mask (K=2, whatever the representation), K one-hot channels, or
    ceil(log2 K) analog bits."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts background too and must be >= 2, got {num_classes}")
    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    if num_classes == 2:
        return 1
    return num_classes if representation == "onehot" else math.ceil(math.log2(num_classes))


def bit_codes(num_classes, device=None):
    """(K, ceil(log2 K)) float {0, 1}: the binary code of each class index, bit 0 first."""
    bits = math.ceil(math.log2(num_classes))
    k = torch.arange(num_classes, device=device)
    return ((k[:, None] >> torch.arange(bits, device=device)) & 1).float()


def one_hot_labels(labels, num_classes):
    """Label map (B, 1, H, W) of class indices -> float one-hot (B, K, H, W)."""
    return torch.nn.functional.one_hot(labels[:, 0].long(), num_classes).permute(0, 3, 1, 2).float()


def encode_labels(labels, num_classes=2, representation="onehot"):
    """Label map (B, 1, H, W), values 0..K-1 (any dtype) -> x0 in {-1, 1}, (B, M, H, W) with
    M = mask_channels(K, representation). K=2: today's 2 * mask - 1."""
    m = mask_channels(num_classes, representation)
    labels = true_labels(labels, num_classes)                             # (B, 1, H, W)
    if num_classes == 2:
        bits = labels.float()
    elif representation == "onehot":
        bits = one_hot_labels(labels, num_classes)
    else:
        bits = bit_codes(num_classes, labels.device)[labels[:, 0]].permute(0, 3, 1, 2)
    assert bits.shape[1] == m
    return bits * 2 - 1


def class_probabilities(x0, num_classes=2, representation="onehot", normalise=True, eps=1e-4):
    """An estimate of x0, (B, M, H, W), as class probabilities.

    K=2: the foreground probability (x0 + 1) / 2 clipped to [0, 1], (B, 1, H, W).
    K>2: a distribution over the K classes, (B, K, H, W). One-hot: each channel's (x0 + 1)
    / 2, clipped (an x0-trained model's estimate of that class's probability, so they
    already sum to about 1) and normalised (uniform where all are 0). Analog bits: each bit
    is on with probability p_b = (x0_b + 1) / 2 (clipped to [eps, 1 - eps]),
    independently; class k gets the probability of its code, prod_b p_b^c_kb (1 -
    p_b)^(1 - c_kb), renormalised over the K valid codes (the 2^M - K unused ones hand
    their mass to the valid ones). normalise=False skips the normalisation: for the loss
    terms, whose gradients it would blow up where every class is near 0."""
    p = ((x0.float() + 1) / 2).clamp(0, 1)
    if num_classes == 2:
        return p
    if representation == "onehot":
        if not normalise:
            return p
        total = p.sum(1, keepdim=True)
        uniform = torch.full_like(p, 1.0 / num_classes)
        return torch.where(total > 0, p / total.clamp(min=1e-12), uniform)
    codes = bit_codes(num_classes, x0.device)[None, :, :, None, None]     # (1, K, M, 1, 1)
    p = p.clamp(eps, 1 - eps)[:, None]                                   # (B, 1, M, H, W)
    probs = (codes * p + (1 - codes) * (1 - p)).prod(2)                  # (B, K, H, W)
    return probs / probs.sum(1, keepdim=True) if normalise else probs


def true_labels(mask, num_classes=2):
    """A mask batch as the loader gives it, float (B, 1, H, W), as long class indices:
    thresholded at 0.5 when binary, rounded when a label map."""
    return (mask > 0.5).long() if num_classes == 2 else mask.round().long()


def labels_from_probabilities(probs, num_classes=2, threshold=0.5):
    """Label maps (long, values 0..K-1) from what `Diffusion.sample` returns: binary
    probabilities (..., H, W) thresholded at `threshold`; class probabilities (..., K, H,
    W) by arg-max over the class axis (so (B, S, K, H, W) -> (B, S, H, W))."""
    if num_classes == 2:
        return (probs > threshold).long()
    return probs.argmax(-3)


def extract(arr, t, shape):
    """Gather arr[t] for a batch of timesteps and reshape to broadcast against `shape`."""
    out = arr.to(t.device)[t].float()                       # (B,)
    return out.reshape(t.shape[0], *([1] * (len(shape) - 1)))  # (B, 1, 1, 1)


def ddim_timesteps(num_timesteps, steps, last_model_t=None):
    """The strided grid the DDIM sampler visits, as a descending list of ints.

    Without a time floor (last_model_t None or T-1): `steps` timesteps evenly spaced from
    T-1 down to 0 inclusive, rounded to the nearest integer: t_i = round((T-1) * (steps-1-i)
    / (steps-1)) for i = 0..steps-1. The first step starts from pure noise at T-1, the last
    lands on t=0. With steps=1 the grid is [T-1]: one jump straight to x0.

    With a time floor (every t above last_model_t = L reaches the network as L): T-1 first
    (pure noise; to the network it is L), then the steps-1 inner points of an even division
    of 0..L into `steps` parts, t = round(L * (steps-1-i) / steps) for i = 0..steps-2, so no
    step after the first is spent where the network cannot tell timesteps apart, and none
    lands on t=0 (trailing spacing, Lin et al. 2024, "Common diffusion noise schedules and
    sample steps are flawed"; with a large shift t=0 is far from clean: abar_0 = 0.86 at
    128 px). The second step re-noises the first estimate with each sample's own noise,
    which is what keeps the samples of an ensemble apart (benchmarks/RESULTS.md, "Samples
    that differ"). At most L steps.
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [num_timesteps - 1]
    if last_model_t is not None and last_model_t < num_timesteps - 1:
        if steps > last_model_t:
            raise ValueError(f"with a time floor the network tells {last_model_t + 1} "
                             f"timesteps apart: at most {max(1, last_model_t)} DDIM steps, "
                             f"got {steps}")
        grid = [num_timesteps - 1] + [round(last_model_t * (steps - 1 - i) / steps)
                                      for i in range(steps - 1)]
    else:
        grid = [round((num_timesteps - 1) * (steps - 1 - i) / (steps - 1)) for i in range(steps)]
    assert len(set(grid)) == steps, grid  # spacing >= 1 keeps rounded values distinct
    return grid


def _randn(shape, generator, device):
    # A generator lives on one device; draw there and move, so a CPU generator seeds a GPU run.
    if generator is None:
        return torch.randn(shape, device=device)
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def mirror_members(x, num_samples):
    """Flip row s of every group of `num_samples` adjacent rows of x (B*S, C, H, W) by
    MIRROR_VIEWS[s % 4]; its own inverse."""
    x = x.clone()
    for s in range(1, num_samples):
        axes = MIRROR_VIEWS[s % len(MIRROR_VIEWS)]
        if axes:
            x[s::num_samples] = x[s::num_samples].flip(axes)
    return x


class Diffusion:
    """The fixed forward process q and the reverse-process samplers built on a noise model.

    All schedule quantities are computed in float64 and stored as float32 CPU tensors; they
    are moved to the caller's device when used, so one object serves any model and device.
    """

    def __init__(self, timesteps=1000, schedule="cosine", prediction="eps", shift=1.0,
                 self_condition=False, timestep_sampling="uniform", loss_weighting="none",
                 min_snr_gamma=5.0, num_classes=2, representation="onehot",
                 input_scaling="none", time_floor=0.0):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
        if timestep_sampling not in TIMESTEP_SAMPLING:
            raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLING}, "
                             f"got {timestep_sampling!r}")
        if input_scaling not in INPUT_SCALINGS:
            raise ValueError(f"input_scaling must be one of {INPUT_SCALINGS}, "
                             f"got {input_scaling!r}")
        if input_scaling == "abar" and prediction == "eps":
            raise ValueError("input_scaling='abar' hides the noise that prediction='eps' must "
                             "return (x_t arrives as ~0 at high noise): use input_scaling='none'")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, "
                             f"got {loss_weighting!r}")
        self.num_timesteps = int(timesteps)
        self.schedule = schedule
        self.prediction = prediction
        self.shift = float(shift)
        # self-conditioning (Chen et al. 2022, "Analog Bits", sec. 3.2): the model also
        # sees its own previous estimate of x0 (zeros when there is none)
        self.self_condition = bool(self_condition)
        self.timestep_sampling = timestep_sampling
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        # the mask: K classes (2 = binary) in M channels of diffusion space
        self.mask_channels = mask_channels(num_classes, representation)
        self.num_classes, self.representation = int(num_classes), representation
        self.input_scaling, self.time_floor = input_scaling, float(time_floor)

        betas = get_beta_schedule(schedule, self.num_timesteps, shift=self.shift).double()
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, 0)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])

        # q(x_t | x_0), Ho eq. 4
        sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        sqrt_one_minus_alphas_cumprod = (1.0 - alphas_cumprod).sqrt()
        # x0 from (x_t, eps), Ho eq. 15 rearranged
        sqrt_recip_alphas_cumprod = (1.0 / alphas_cumprod).sqrt()
        sqrt_recipm1_alphas_cumprod = (1.0 / alphas_cumprod - 1.0).sqrt()
        # q(x_{t-1} | x_t, x_0), Ho eqs. 6-7
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # the variance is 0 at t=0; log of the t=1 value there keeps it finite (improved-DDPM)
        posterior_log_variance_clipped = torch.log(
            torch.cat([posterior_variance[1:2], posterior_variance[1:]]))
        posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1.0 - alphas_cumprod)
        posterior_mean_coef2 = (1.0 - alphas_cumprod_prev) * alphas.sqrt() / (1.0 - alphas_cumprod)

        f32 = lambda x: x.float()  # noqa: E731
        self.betas = f32(betas)
        self.alphas_cumprod = f32(alphas_cumprod)
        self.alphas_cumprod_prev = f32(alphas_cumprod_prev)
        self.sqrt_alphas_cumprod = f32(sqrt_alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = f32(sqrt_one_minus_alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = f32(sqrt_recip_alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = f32(sqrt_recipm1_alphas_cumprod)
        self.posterior_variance = f32(posterior_variance)
        self.posterior_log_variance_clipped = f32(posterior_log_variance_clipped)
        self.posterior_mean_coef1 = f32(posterior_mean_coef1)
        self.posterior_mean_coef2 = f32(posterior_mean_coef2)
        self._abar = self.alphas_cumprod.tolist()   # the float32 table as Python floats, for DDIM
        self.loss_weights = f32(self._loss_weights(alphas_cumprod))
        # What the network sees of x_t and t (model_args). input_scaling="abar": the noisy
        # mask times sqrt(abar_t), its least-squares linear estimate of x0 (x0 in {-1, 1}
        # has unit second moment), so a step whose x_t holds no signal hands the network
        # ~0 instead of full-strength noise. time_floor: the timesteps with abar_t below it
        # all reach the network as the first of them, so those steps, where the image alone
        # decides the mask, train one function instead of one per timestep index.
        self.last_model_t = (self.num_timesteps - 1 if self.time_floor <= 0 else
                             min(self.num_timesteps - 1,
                                 int((alphas_cumprod >= self.time_floor).sum())))

    @property
    def max_ddim_steps(self):
        """The most DDIM steps ddim_timesteps allows (T without a time floor); the full
        ancestral sampler (steps = T) is always there."""
        if self.last_model_t >= self.num_timesteps - 1:
            return self.num_timesteps
        return max(1, self.last_model_t)

    def _loss_weights(self, alphas_cumprod):
        """The loss_weight table, float64, shape (T,)."""
        if self.loss_weighting == "none":
            return torch.ones_like(alphas_cumprod)
        snr = alphas_cumprod / (1 - alphas_cumprod)
        clipped = snr.clamp(max=self.min_snr_gamma)
        weight = {"x0": clipped, "x0_logits": clipped, "eps": clipped / snr,
                  "v": clipped / (snr + 1)}[self.prediction]   # |v error|^2 = (1 + SNR) |x0 error|^2
        return weight / weight.mean()

    TABLES = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
              "sqrt_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
              "sqrt_recipm1_alphas_cumprod", "posterior_variance",
              "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
              "loss_weights")

    def to(self, device):
        """Keep the schedule tables on `device`, so gathering them never copies host to GPU
        (a stream sync) inside the training step or the sampling loop. Returns self."""
        with torch.inference_mode(False):  # never turn the tables into inference tensors
            for name in self.TABLES:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def __repr__(self):
        return (f"Diffusion(timesteps={self.num_timesteps}, schedule={self.schedule!r}, "
                f"prediction={self.prediction!r}, shift={self.shift:g}, "
                f"self_condition={self.self_condition}, num_classes={self.num_classes}"
                + (f", representation={self.representation!r}" if self.num_classes > 2 else "")
                + (f", input_scaling={self.input_scaling!r}"
                   if self.input_scaling != "none" else "")
                + (f", time_floor={self.time_floor:g}" if self.time_floor > 0 else "") + ")")

    # ------------------------------------------------------------------ the mask's coding
    def encode(self, labels):
        """Label map or binary mask (B, 1, H, W) -> x0 in {-1, 1}, (B, M, H, W)."""
        return encode_labels(labels, self.num_classes, self.representation)

    def probabilities(self, x0, normalise=True):
        """x0 estimate -> foreground probability (B, 1, H, W) if binary, else the class
        distribution (B, K, H, W); see class_probabilities."""
        return class_probabilities(x0, self.num_classes, self.representation, normalise)

    def foreground(self, per_class):
        """The foreground channels of a binary map (B, 1, H, W: itself) or of a per-class
        map (B, K, H, W: all but background, (B, K-1, H, W)): what the Dice, boundary and
        Hausdorff terms and the overlap scores are computed on, class by class."""
        return per_class if self.num_classes == 2 else per_class[:, 1:]

    def one_hot(self, labels):
        """Label map (B, 1, H, W) -> per-class indicator, the shape `probabilities` gives:
        the mask itself when binary, (B, K, H, W) one-hot otherwise."""
        if self.num_classes == 2:
            return labels.float()
        return one_hot_labels(true_labels(labels, self.num_classes), self.num_classes)

    # ----------------------------------------------------------------- forward process
    def sample_timesteps(self, n, device=None, generator=None):
        """n training timesteps, a long tensor of shape (n,) with values in 0..T-1: uniform,
        or with timestep_sampling="logit_normal" t = floor(T sigmoid(u)), u ~ N(0, 1)
        (Esser et al. 2024, eq. 19), which trains the middle timestep indices more often and
        both ends less (with a large schedule shift, the middle indices are already very
        noisy)."""
        gen_device = generator.device if generator is not None else device
        if self.timestep_sampling == "uniform":
            t = torch.randint(0, self.num_timesteps, (n,), generator=generator,
                              device=gen_device)
        else:
            u = torch.randn(n, generator=generator, device=gen_device)
            t = (torch.sigmoid(u) * self.num_timesteps).long().clamp_(0, self.num_timesteps - 1)
        return t.to(device) if device is not None else t

    def loss_weight(self, t):
        """Per-example weight of the regression loss at timesteps t, shape (B,): 1, or
        min-SNR-gamma (Hang et al. 2023, eq. 9 and its variants for eps and v): the weight
        that makes the loss on any prediction type min(SNR, gamma) times the error of x0, so
        the nearly clean steps, which are easy, stop dominating the gradient. Normalised to
        mean 1 over the T timesteps, so a schedule shift (which moves every SNR) changes the
        balance between timesteps, not the loss's scale against the other terms."""
        return self.loss_weights.to(t.device)[t]

    def noise_image(self, x0, t, noise=None):
        """Sample q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I), Ho eq. 4.

        x0 is already in diffusion space [-1, 1]; t is a long tensor of shape (B,).
        Returns (x_t, noise); pass `noise` to pin it (tests, validation at fixed noise).
        """
        if noise is None:
            noise = torch.randn_like(x0, dtype=torch.float32)
        x0 = x0.float()
        x_t = (extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0
               + extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise)
        return x_t, noise

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0), Ho eqs. 6-7."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x0
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract(self.posterior_variance, t, x_t.shape)
        log_variance = extract(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # ----------------------------------------------------- what the model is trained on
    def training_target(self, x0, noise, t):
        """The regression target for the configured prediction type (x0_logits: x0 itself,
        met through logits_loss, not a regression)."""
        if self.prediction == "eps":
            return noise
        if self.prediction in ("x0", "x0_logits"):
            return x0.float()
        # v = sqrt(abar) eps - sqrt(1 - abar) x0  (Salimans & Ho 2022)
        return (extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0.float())

    def predict_x0_eps(self, x_t, t, model_output, clip=True):
        """Recover (x0, eps) from the model output, whatever it predicts.

        With clip=True, x0 is clipped to [-1, 1] and eps is recomputed from the clipped x0
        so the pair stays consistent with x_t (as improved-diffusion does for DDIM).
        """
        out = model_output.float()
        sqrt_ac = extract(self.sqrt_alphas_cumprod, t, x_t.shape)
        sqrt_1m_ac = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        if self.prediction == "eps":
            eps = out
            x0 = (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                  - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * eps)
        elif self.prediction == "x0":
            x0 = out
            eps = (x_t - sqrt_ac * x0) / sqrt_1m_ac
        elif self.prediction == "x0_logits":
            x0 = self.logits_to_x0(out)
            eps = (x_t - sqrt_ac * x0) / sqrt_1m_ac
        else:  # v
            x0 = sqrt_ac * x_t - sqrt_1m_ac * out
            eps = sqrt_1m_ac * x_t + sqrt_ac * out
        if clip:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - sqrt_ac * x0) / sqrt_1m_ac
        return x0, eps

    def logits_to_x0(self, logits):
        """x0_logits: the network's output as x0 in [-1, 1]: 2 sigmoid - 1 per channel
        (binary masks, analog bits), 2 softmax - 1 over one-hot channels."""
        if self.num_classes > 2 and self.representation == "onehot":
            return 2 * logits.softmax(1) - 1
        return torch.tanh(logits / 2)                      # = 2 sigmoid(logits) - 1

    def logits_loss(self, logits, x0):
        """x0_logits: cross-entropy of the predicted logits against the clean mask x0 in
        {-1, 1}, per image (B,): binary cross-entropy per channel (binary masks, analog
        bits), or softmax cross-entropy over one-hot channels, mean over pixels."""
        if self.num_classes > 2 and self.representation == "onehot":
            return torch.nn.functional.cross_entropy(
                logits.float(), x0.argmax(1), reduction="none").flatten(1).mean(1)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            logits.float(), (x0.float() + 1) / 2, reduction="none").flatten(1).mean(1)

    def comparable_output(self, model_output):
        """The output in the units of training_target (x0_logits: as x0), for val MSE."""
        return self.logits_to_x0(model_output) if self.prediction == "x0_logits" else model_output

    # ------------------------------------------------------------------- samplers
    def model_args(self, x_t, t, image, x0_prev=None):
        """What the network is called with at (x_t, t): (x_in, t_in), for model(x_in, t_in);
        the one place that builds them (training, validation and sampling all call this).
        x_in stacks the noisy mask (times sqrt(abar_t) with input_scaling="abar"), with
        self-conditioning x0_prev (zeros when None, as at the first step; ignored without),
        and the image (model_input). t_in is t, capped at last_model_t by a time_floor."""
        x_seen = x_t if self.input_scaling == "none" else (
            x_t * extract(self.sqrt_alphas_cumprod, t, x_t.shape).to(x_t.dtype))
        if self.self_condition:
            x_in = model_input(x_seen, image,
                               torch.zeros_like(x_t) if x0_prev is None else x0_prev)
        else:
            x_in = model_input(x_seen, image)
        return x_in, t.clamp(max=self.last_model_t)

    def _model_output(self, model, x_t, image, t, x0_prev=None):
        dtype = next(model.parameters()).dtype
        x_in, t_in = self.model_args(x_t, t, image, x0_prev)
        return model(x_in.to(dtype), t_in).float()                      # (B, M, H, W)

    def p_sample_step(self, model, x_t, image, t_int, generator=None, x0_prev=None):
        """One ancestral step x_t -> x_{t-1} (Ho Algorithm 2, posterior variance).

        Returns (x_{t-1}, predicted x0). At t=0 no noise is added and x_{t-1} is x0.
        x0_prev: the previous step's predicted x0, for self-conditioning.
        """
        t = torch.full((x_t.shape[0],), t_int, device=x_t.device, dtype=torch.long)
        x0, _ = self.predict_x0_eps(x_t, t, self._model_output(model, x_t, image, t, x0_prev))
        mean, _, log_variance = self.q_posterior(x0, x_t, t)
        if t_int == 0:
            return mean, x0
        noise = _randn(x_t.shape, generator, x_t.device)
        return mean + (0.5 * log_variance).exp() * noise, x0

    def ddim_step(self, model, x_t, image, t_int, t_prev_int, eta=0.0, generator=None,
                  x0_prev=None):
        """One DDIM step x_t -> x_{t_prev} (Song et al. eq. 12); t_prev=-1 means x0.

        sigma = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev):
        eta=0 is the deterministic DDIM, eta=1 the stochastic one matching DDPM's variance.
        x0_prev: the previous step's predicted x0, for self-conditioning.
        """
        t = torch.full((x_t.shape[0],), t_int, device=x_t.device, dtype=torch.long)
        x0, eps = self.predict_x0_eps(x_t, t, self._model_output(model, x_t, image, t,
                                                                 x0_prev))
        if t_prev_int < 0:
            return x0, x0
        abar_t, abar_prev = self._abar[t_int], self._abar[t_prev_int]
        sigma = eta * ((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)) ** 0.5
        x_prev = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
        if sigma > 0:
            x_prev = x_prev + sigma * _randn(x_t.shape, generator, x_t.device)
        return x_prev, x0

    def sample_progressive(self, model, image, steps=None, eta=0.0, generator=None,
                           progress=False, noise=None):
        """Yield (t, x_t, predicted x0) after every reverse step; for notebooks and videos.

        steps=None or steps=T: the full ancestral DDPM sampler over T-1..0.
        Fewer steps: DDIM on the grid of `ddim_timesteps(T, steps, last_model_t)` with the
        given eta.
        noise: the starting x_T, (B, M, H, W); drawn from `generator` when None.
        """
        steps = self.num_timesteps if steps is None else int(steps)
        device = next(model.parameters()).device
        self.to(device)
        image = image.to(device=device, dtype=torch.float32)
        b, _, h, w = image.shape
        x_t = (_randn((b, self.mask_channels, h, w), generator, device) if noise is None
               else noise.to(device=device, dtype=torch.float32))  # (B, M, H, W) at T-1
        if steps == self.num_timesteps:
            grid = list(range(self.num_timesteps - 1, -1, -1))
        else:
            grid = ddim_timesteps(self.num_timesteps, steps, self.last_model_t)
        ancestral = steps == self.num_timesteps
        x0 = None   # the previous estimate, for self-conditioning: none before the first step
        for i in tqdm(range(len(grid)), disable=not progress, desc="sampling", leave=False):
            t_int = grid[i]
            if ancestral:
                x_t, x0 = self.p_sample_step(model, x_t, image, t_int, generator, x0)
            else:
                t_prev = grid[i + 1] if i + 1 < len(grid) else -1
                x_t, x0 = self.ddim_step(model, x_t, image, t_int, t_prev, eta, generator, x0)
            yield t_int, x_t, x0

    def sample(self, model, image, steps=None, eta=0.0, generator=None, progress=False,
               num_samples=1, max_batch=None, noise=None, mirror=False):
        """Generate masks for a batch of images, S = num_samples per image: binary masks as
        foreground probabilities in [0, 1], (B, S, H, W); label maps of K > 2 classes as
        class probabilities, (B, S, K, H, W) (S = 1 included). labels_from_probabilities
        turns either into label maps.

        model: the noise model, called as model(*self.model_args(x_t, t, image)); its device and
        dtype decide where sampling runs. image: (B, C, H, W). No process group is needed.
        The S samples of every image are drawn in one batched pass of B*S, split into
        chunks of at most `max_batch` when memory is short. noise: the starting x_T of
        every sample, (B*S, M, H, W) with each image's S samples adjacent; drawn from
        `generator` when None. mirror: sample s of every image sees the image flipped as
        MIRROR_VIEWS[s % 4] and its mask is flipped back (test-time mirroring, for a model
        trained with flips: the members then differ by more than their noise); sample 0
        always sees the image as it is. A given `noise` start is taken in the member's view.
        """
        b, _, h, w = image.shape
        repeated = image.repeat_interleave(num_samples, dim=0)     # (B*S, C, H, W)
        if mirror:
            repeated = mirror_members(repeated, num_samples)
        chunk = max_batch or repeated.shape[0]
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                probs = []
                starts = noise.split(chunk) if noise is not None else [None] * len(
                    repeated.split(chunk))
                for part, start in zip(repeated.split(chunk), starts):
                    x0 = None
                    for _, _, x0 in self.sample_progressive(model, part, steps, eta, generator,
                                                            progress, start):
                        pass
                    probs.append(self.probabilities(x0))           # (b*S, 1 or K, H, W)
                probs = torch.cat(probs)
                if mirror:
                    probs = mirror_members(probs, num_samples)   # back to the image's frame
                if self.num_classes == 2:
                    return probs.reshape(b, num_samples, h, w)
                return probs.reshape(b, num_samples, self.num_classes, h, w)
        finally:
            model.train(was_training)
