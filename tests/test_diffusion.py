"""Tests of tokencache.diffusion against formulas written out by hand in float64.

Nothing here imports the official ADM/DiT code: the references are the
equations of DDPM (Ho et al. 2020), IDDPM (Nichol & Dhariwal 2021) and DDIM
(Song et al. 2021), evaluated independently of the library.
"""
import math

import numpy as np
import pytest
import torch

from tokencache.diffusion import create_diffusion, randn_rows, space_timesteps

C, H, W = 2, 4, 4
T = 1000


def original_alpha_bar():
    """alpha_bar_t of DDPM's linear schedule, beta from 1e-4 to 0.02 over 1000 steps."""
    betas = np.array([1e-4 + (0.02 - 1e-4) * i / (T - 1) for i in range(T)], dtype=np.float64)
    return np.cumprod(1.0 - betas)


def elementwise_model(x, t, y=None):
    """A fixed 'network' returning eps and v (2*C channels) that depends on x and t.

    Elementwise, so a row's output cannot depend on the other rows of the batch
    through any batched kernel.
    """
    tt = t.float().view(-1, 1, 1, 1) / 1000.0
    eps = torch.tanh(0.7 * x + 2.0 * tt - 0.3)
    v = torch.tanh(0.5 * x - tt)
    if y is not None:
        eps = eps + 0.01 * y.float().view(-1, 1, 1, 1)
    return torch.cat([eps, v], dim=1)


class ConvModel(torch.nn.Module):
    """A small fixed random conv net with timestep input, 2*C output channels."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = torch.nn.Conv2d(C, 2 * C, 3, padding=1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g) * 0.3)
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g) * 0.1)

    def forward(self, x, t):
        out = self.conv(x) + (t.float() / 1000.0).view(-1, 1, 1, 1)
        eps, v = out.chunk(2, dim=1)
        return torch.cat([eps, torch.tanh(v)], dim=1)


# ----------------------------------------------------------------------------- respacing


def test_respacing_250_is_evenly_spread_fractional_stride():
    d = create_diffusion("250")
    steps = list(d.timestep_map)
    assert d.num_timesteps == 250 == len(steps)
    assert steps == sorted(set(steps))
    assert steps[0] == 0 and steps[-1] == T - 1
    stride = (T - 1) / 249
    for i, s in enumerate(steps):
        assert abs(s - i * stride) <= 0.5 + 1e-9
    assert set(np.diff(steps)) <= {4, 5}


def test_respacing_ddim50_is_integer_stride_20():
    d = create_diffusion("ddim50")
    assert list(d.timestep_map) == list(range(0, 1000, 20))
    assert d.num_timesteps == 50


@pytest.mark.parametrize("spec", ["ddim37", "ddim700"])
def test_respacing_ddim_without_exact_integer_stride_raises(spec):
    with pytest.raises(ValueError):
        space_timesteps(T, spec)


@pytest.mark.parametrize("spec", ["", None])
def test_empty_respacing_keeps_all_steps(spec):
    d = create_diffusion(spec)
    assert list(d.timestep_map) == list(range(T))
    assert np.allclose(d.alphas_cumprod, original_alpha_bar(), rtol=1e-12, atol=0)


def test_section_counts_spread_within_each_section():
    steps = sorted(space_timesteps(T, "10,20"))
    assert len(steps) == 30
    first, second = steps[:10], steps[10:]
    assert first[0] == 0 and first[-1] == 499 and all(s < 500 for s in first)
    assert second[0] == 500 and second[-1] == 999
    with pytest.raises(ValueError):
        space_timesteps(10, "6,1")  # 5 steps cannot hold 6


def test_linear_schedule_endpoints_and_scaling():
    d = create_diffusion("")
    assert d.betas.dtype == np.float64
    assert d.betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert d.betas[-1] == pytest.approx(0.02, abs=1e-15)
    d500 = create_diffusion("", diffusion_steps=500)
    assert d500.betas[0] == pytest.approx(2e-4, abs=1e-15)
    assert d500.betas[-1] == pytest.approx(0.04, abs=1e-15)


@pytest.mark.parametrize("spec", ["250", "ddim50", "10,20,30", "ddim10"])
def test_respaced_alpha_bar_equals_original_at_kept_steps(spec):
    d = create_diffusion(spec)
    abar = original_alpha_bar()[np.array(d.timestep_map)]
    np.testing.assert_allclose(d.alphas_cumprod, abar, rtol=1e-12, atol=0)
    # beta'_i = 1 - alpha_bar_{S_i} / alpha_bar_{S_{i-1}}
    prev = np.append(1.0, abar[:-1])
    np.testing.assert_allclose(d.betas, 1.0 - abar / prev, rtol=1e-12, atol=0)


# ------------------------------------------------------------------- single steps


def _abar_pair(d, i):
    """alpha_bar at respaced index i and at i-1 (1 before the first step), float64, by hand."""
    abar = original_alpha_bar()
    now = abar[d.timestep_map[i]]
    prev = abar[d.timestep_map[i - 1]] if i > 0 else 1.0
    return now, prev


@pytest.mark.parametrize("i", [0, 1, 25, 49])
@pytest.mark.parametrize("clip", [False, True])
def test_ddim_eta0_step_matches_hand_formula(i, clip):
    d = create_diffusion("ddim50")
    model = ConvModel()
    x = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(i)) * 1.3
    t = torch.full((3,), i, dtype=torch.long)

    with torch.no_grad():
        out = d.ddim_sample(model, x, t, clip_denoised=clip, eta=0.0)["sample"]
        eps = model(x, torch.full((3,), d.timestep_map[i]))[:, :C].double()

    xd = x.double()
    abar, abar_prev = _abar_pair(d, i)
    x0 = (xd - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (xd - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
    expected = math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("spec,i", [("250", 0), ("250", 1), ("250", 137), ("250", 249),
                                    ("ddim50", 3), ("", 0), ("", 500), ("", 999)])
def test_learned_range_variance_and_mean_match_hand_formula(spec, i):
    d = create_diffusion(spec)
    x = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(1))
    t = torch.full((2,), i, dtype=torch.long)
    out = d.p_mean_variance(elementwise_model, x, t, clip_denoised=False)

    raw = elementwise_model(x, torch.full((2,), d.timestep_map[i])).double()
    eps, v = raw[:, :C], raw[:, C:]
    abar, abar_prev = _abar_pair(d, i)
    beta = 1 - abar / abar_prev
    # beta_tilde_t = beta_t (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t), clipped at t = 0 to beta_tilde_1
    if i == 0:
        abar1, abar0 = _abar_pair(d, 1)
        beta_tilde = (1 - abar1 / abar0) * (1 - abar0) / (1 - abar1)
    else:
        beta_tilde = beta * (1 - abar_prev) / (1 - abar)
    frac = (v + 1) / 2
    log_var = frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)
    torch.testing.assert_close(out["log_variance"].double(), log_var, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out["variance"].double(), log_var.exp(), rtol=1e-5, atol=1e-12)

    x0 = (x.double() - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    coef1 = math.sqrt(abar_prev) * beta / (1 - abar)
    coef2 = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
    torch.testing.assert_close(out["pred_xstart"].double(), x0, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["mean"].double(), coef1 * x0 + coef2 * x.double(),
                               rtol=1e-5, atol=1e-4)


def test_clip_denoised_clamps_pred_xstart():
    d = create_diffusion("ddim50")
    x = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(2)) * 3
    t = torch.full((2,), 49, dtype=torch.long)
    clipped = d.p_mean_variance(elementwise_model, x, t, clip_denoised=True)["pred_xstart"]
    free = d.p_mean_variance(elementwise_model, x, t, clip_denoised=False)["pred_xstart"]
    assert free.abs().max() > 1.5
    assert clipped.abs().max() <= 1.0
    torch.testing.assert_close(clipped, free.clamp(-1, 1))


def test_ddpm_step_is_mean_plus_sigma_noise():
    d = create_diffusion("250")
    x = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(3, C, H, W, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([100, 0, 249])
    out = d.p_mean_variance(elementwise_model, x, t)
    step = d.p_sample(elementwise_model, x, t, noise=noise)["sample"]
    expected = out["mean"] + torch.exp(0.5 * out["log_variance"]) * noise
    expected[1] = out["mean"][1]  # no noise at t = 0
    torch.testing.assert_close(step, expected, rtol=0, atol=1e-6)

    # Drawing from a generator is the same as passing that generator's noise.
    via_gen = d.p_sample(elementwise_model, x, t, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(via_gen["sample"], step, rtol=0, atol=0)


# -------------------------------------------------------------- model interface


class RecordingModel:
    """Records the timesteps it is called with (and when) and returns fixed outputs."""

    def __init__(self, events=None):
        self.timesteps = []
        self.events = events if events is not None else []

    def __call__(self, x, t, **kwargs):
        self.timesteps.append(t.clone())
        self.events.append(("model", int(t[0])))
        return elementwise_model(x, t, **kwargs)


@pytest.mark.parametrize("spec", ["250", "ddim50"])
def test_model_receives_original_timesteps(spec):
    d = create_diffusion(spec)
    rec = RecordingModel()
    d.p_sample_loop(rec, (2, C, H, W), generator=torch.Generator().manual_seed(0))
    assert len(rec.timesteps) == d.num_timesteps
    received = [int(t[0]) for t in rec.timesteps]
    assert received == list(d.timestep_map)[::-1]
    assert all(t.dtype == torch.long and t.shape == (2,) and (t == t[0]).all()
               for t in rec.timesteps)

    rec = RecordingModel()
    d.ddim_sample_loop(rec, (2, C, H, W), generator=torch.Generator().manual_seed(0))
    assert [int(t[0]) for t in rec.timesteps] == list(d.timestep_map)[::-1]

    rec = RecordingModel()
    x0 = torch.zeros(3, C, H, W)
    d.training_losses(rec, x0, torch.tensor([0, 7, d.num_timesteps - 1]))
    assert rec.timesteps[0].tolist() == [d.timestep_map[0], d.timestep_map[7], d.timestep_map[-1]]


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_step_listener_sees_every_step_before_the_model(loop):
    d = create_diffusion("ddim10")
    events = []
    rec = RecordingModel(events)
    getattr(d, loop)(
        rec, (2, C, H, W), generator=torch.Generator().manual_seed(0),
        step_listener=lambda i, n: events.append(("step", i, n)),
    )
    steps = [e for e in events if e[0] == "step"]
    assert steps == [("step", i, 10) for i in range(10)]
    # Strictly alternating: listener, then the model call of that step.
    assert [e[0] for e in events] == ["step", "model"] * 10
    assert [e[1] for e in events if e[0] == "model"] == list(range(0, 1000, 100))[::-1]


def test_model_kwargs_are_passed_and_progress_bar_runs():
    d = create_diffusion("ddim5")
    seen = []

    def model(x, t, y):
        seen.append(y)
        return elementwise_model(x, t, y)

    y = torch.tensor([3, 4])
    d.ddim_sample_loop(model, (2, C, H, W), model_kwargs={"y": y}, progress=True,
                       generator=torch.Generator().manual_seed(0))
    assert len(seen) == 5 and all(s is y for s in seen)


# ------------------------------------------------------------------- randomness


def test_randn_rows_draws_each_row_from_its_own_generator():
    gens = [torch.Generator().manual_seed(100 + i) for i in range(3)]
    out = randn_rows((3, C, H, W), gens, device="cpu", dtype=torch.float32)
    for i in range(3):
        ref = torch.randn((C, H, W), generator=torch.Generator().manual_seed(100 + i))
        assert torch.equal(out[i], ref)
    with pytest.raises(ValueError):
        randn_rows((2, C, H, W), gens, device="cpu", dtype=torch.float32)


def _trajectory(d, loop, batch_seeds, **kw):
    gens = [torch.Generator().manual_seed(s) for s in batch_seeds]
    progressive = getattr(d, loop + "_progressive")
    return [out["sample"] for out in progressive(
        elementwise_model, (len(batch_seeds), C, H, W), generator=gens, **kw)]


@pytest.mark.parametrize("loop,spec,kw", [("p_sample_loop", "25", {}),
                                          ("ddim_sample_loop", "ddim10", {"eta": 1.0}),
                                          ("ddim_sample_loop", "ddim10", {"eta": 0.0})])
def test_per_row_generators_make_samples_batch_independent(loop, spec, kw):
    d = create_diffusion(spec)
    seeds = [11, 12, 13, 14, 15]
    batch = _trajectory(d, loop, seeds, **kw)
    alone = _trajectory(d, loop, [13], **kw)
    assert len(batch) == len(alone) == d.num_timesteps
    for step_batch, step_alone in zip(batch, alone):
        assert torch.equal(step_batch[2:3], step_alone)
    # The rows really differ, so the equality above is not trivial.
    assert not torch.equal(batch[-1][1], batch[-1][2])


def test_single_generator_is_not_batch_independent():
    """Control for the test above: one shared generator couples the rows."""
    d = create_diffusion("25")
    batch = d.p_sample_loop(elementwise_model, (5, C, H, W),
                            generator=torch.Generator().manual_seed(13))
    alone = d.p_sample_loop(elementwise_model, (1, C, H, W),
                            generator=torch.Generator().manual_seed(13))
    assert not torch.equal(batch[2:3], alone)


@pytest.mark.parametrize("loop,kw", [("p_sample_loop", {}), ("ddim_sample_loop", {"eta": 0.5})])
def test_global_rng_path_draws_like_torch_randn(loop, kw):
    """generator=None consumes the global RNG exactly as a generator with the same seed."""
    d = create_diffusion("ddim10")
    torch.manual_seed(1234)
    global_rng = getattr(d, loop)(elementwise_model, (2, C, H, W), **kw)
    after_global = torch.randn(1)
    gen = torch.Generator().manual_seed(1234)
    with_gen = getattr(d, loop)(elementwise_model, (2, C, H, W), generator=gen, **kw)
    assert torch.equal(global_rng, with_gen)
    # One initial draw plus one draw per step, as in ADM (also at t = 0).
    assert torch.equal(after_global, torch.randn(1, generator=gen))


def test_ddim_eta0_is_deterministic_given_noise():
    d = create_diffusion("ddim10")
    z = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(5))
    a = d.ddim_sample_loop(elementwise_model, z.shape, z, generator=torch.Generator().manual_seed(1))
    b = d.ddim_sample_loop(elementwise_model, z.shape, z, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(elementwise_model, z.shape, z, eta=1.0,
                           generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(a, c)


# --------------------------------------------------------------------- training


def test_training_losses_are_finite_per_sample_and_vb_trains_only_sigma():
    d = create_diffusion("")
    B = 4
    x0 = torch.rand(B, C, H, W, generator=torch.Generator().manual_seed(6)) * 2 - 1
    t = torch.tensor([0, 1, 500, 999])
    noise = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(7))
    out_param = torch.nn.Parameter(torch.randn(B, 2 * C, H, W) * 0.5)

    terms = d.training_losses(lambda x, tt: out_param, x0, t, noise=noise)
    for key in ("loss", "mse", "vb"):
        assert terms[key].shape == (B,)
        assert torch.isfinite(terms[key]).all()
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"])
    eps_pred = out_param[:, :C].detach()
    torch.testing.assert_close(terms["mse"], ((noise - eps_pred) ** 2).mean(dim=(1, 2, 3)))

    terms["vb"].sum().backward()
    assert torch.count_nonzero(out_param.grad[:, :C]) == 0  # the mean is frozen in the VB term
    assert torch.count_nonzero(out_param.grad[:, C:]) > 0


def test_training_losses_use_q_sample_with_given_noise():
    d = create_diffusion("250")
    x0 = torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(8)) * 2 - 1
    noise = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([3, 200])
    seen = []

    def model(x, tt):
        seen.append(x.clone())
        return elementwise_model(x, tt)

    d.training_losses(model, x0, t, noise=noise)
    abar = torch.tensor(original_alpha_bar()[[d.timestep_map[3], d.timestep_map[200]]])
    x_t = abar.sqrt().view(-1, 1, 1, 1) * x0.double() + (1 - abar).sqrt().view(-1, 1, 1, 1) * noise
    torch.testing.assert_close(seen[0].double(), x_t, rtol=1e-6, atol=1e-6)


def test_unknown_beta_schedule_is_a_user_error_naming_the_choices():
    from tokencache.diffusion.schedules import get_named_beta_schedule

    assert get_named_beta_schedule("linear", 1000).shape == (1000,)
    with pytest.raises(ValueError, match="'linear' or 'squaredcos_cap_v2'"):
        get_named_beta_schedule("cosine", 1000)
