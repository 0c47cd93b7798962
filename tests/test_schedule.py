"""NoiseSchedule against diffusers' DDPMScheduler: tables in float64, the training helpers, the config."""
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from ldmcore.schedule import NoiseSchedule

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear"),
    dict(beta_schedule="squaredcos_cap_v2"),
]
SD15_SCHEDULER_CONFIG = {  # stable-diffusion-v1-5/scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


class _Float64Torch:
    """`torch` in which float32 means float64, to run diffusers' own scheduler code in double precision."""

    def __getattr__(self, name):
        return torch.float64 if name == "float32" else getattr(torch, name)


def _ddpm(schedule: NoiseSchedule, monkeypatch=None) -> DDPMScheduler:
    """diffusers' DDPMScheduler for this schedule; in float64 when given pytest's monkeypatch."""
    if monkeypatch is None:
        return DDPMScheduler.from_config(schedule.to_config())
    with monkeypatch.context() as m:
        m.setattr(scheduling_ddpm, "torch", _Float64Torch())
        scheduler = DDPMScheduler.from_config(schedule.to_config())
    assert scheduler.alphas_cumprod.dtype == torch.float64  # the patch took
    return scheduler


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("kw", SCHEDULES, ids=lambda kw: kw["beta_schedule"])
def test_tables_match_diffusers(monkeypatch, kw, zero_snr):
    ours = NoiseSchedule(**kw, rescale_betas_zero_snr=zero_snr)
    theirs = _ddpm(ours, monkeypatch)
    torch.testing.assert_close(ours.betas, theirs.betas, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=1e-12)
    theirs32 = _ddpm(ours)  # the stock float32 tables agree to float32 precision
    torch.testing.assert_close(ours.alphas_cumprod.float(), theirs32.alphas_cumprod, rtol=1e-5, atol=1e-7)
    if zero_snr:
        assert ours.alphas_cumprod[-1] < 1e-20 and ours.alphas_cumprod[0] == pytest.approx(1 - ours.betas[0].item())


@pytest.mark.parametrize("zero_snr", [False, True])
def test_sigmas_and_snr(zero_snr):
    s = NoiseSchedule(rescale_betas_zero_snr=zero_snr)
    acp = s.alphas_cumprod
    torch.testing.assert_close(s.sigmas, ((1 - acp) / acp).sqrt(), rtol=1e-15, atol=0)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    snr = s.snr(t)
    assert snr.dtype == torch.float32 and snr.shape == (6,)
    torch.testing.assert_close(snr.double(), acp[t] / (1 - acp[t]), rtol=1e-6, atol=0)
    assert (snr[-1] == 0) == zero_snr and torch.isinf(s.sigmas[-1]) == zero_snr


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_add_noise_and_velocity_match_diffusers(monkeypatch, dtype, tol):
    ours = NoiseSchedule(prediction_type="v_prediction")
    theirs = _ddpm(ours, monkeypatch if dtype == torch.float64 else None)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 6, 4, 8, 8, generator=g, dtype=dtype)
    t = torch.tensor([0, 1, 400, 401, 998, 999])
    x_t = ours.add_noise(x0, noise, t)
    assert x_t.dtype == dtype
    torch.testing.assert_close(x_t, theirs.add_noise(x0, noise, t), rtol=0, atol=tol)
    torch.testing.assert_close(ours.target(x0, noise, t), theirs.get_velocity(x0, noise, t), rtol=0, atol=tol)


def test_targets_and_conversions_invert():
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 5, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 500, 900, 999])
    for prediction_type in ("epsilon", "v_prediction", "sample"):
        s = NoiseSchedule(prediction_type=prediction_type)
        x_t, out = s.add_noise(x0, noise, t), s.target(x0, noise, t)
        torch.testing.assert_close(s.predicted_x0(x_t, out, t), x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(s.predicted_noise(x_t, out, t), noise, rtol=0, atol=1e-9)
    s = NoiseSchedule()
    assert torch.equal(s.target(x0, noise, t), noise)
    assert torch.equal(NoiseSchedule(prediction_type="sample").target(x0, noise, t), x0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_x0_matches_diffusers_step(prediction_type):
    ours = NoiseSchedule(prediction_type=prediction_type)
    theirs = _ddpm(ours)
    g = torch.Generator().manual_seed(2)
    x_t, out = torch.randn(2, 3, 4, 8, 8, generator=g)
    for t in (1, 300, 999):
        expected = theirs.step(out, t, x_t, generator=g).pred_original_sample
        got = ours.predicted_x0(x_t, out, torch.full((3,), t))
        torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)


def test_results_keep_the_input_dtype():
    s = NoiseSchedule(prediction_type="v_prediction")
    x0, noise = torch.randn(2, 2, 4, 8, 8, dtype=torch.bfloat16)
    t = torch.tensor([3, 700])
    for f in (s.add_noise, s.target, s.predicted_x0, s.predicted_noise):
        assert f(x0, noise, t).dtype == torch.bfloat16
    ref = s.add_noise(x0.float(), noise.float(), t)  # computed in float32, then rounded once
    assert torch.equal(s.add_noise(x0, noise, t), ref.bfloat16())


def test_from_config_reads_a_diffusers_file_and_round_trips():
    s = NoiseSchedule.from_config(SD15_SCHEDULER_CONFIG)
    assert s == NoiseSchedule()  # SD 1.x is the default
    assert NoiseSchedule.from_config(s.to_config()) == s
    v = NoiseSchedule(prediction_type="v_prediction", timestep_spacing="trailing", rescale_betas_zero_snr=True)
    for cls in (DDIMScheduler, DDPMScheduler):
        d = cls.from_config(v.to_config())
        for key in ("prediction_type", "timestep_spacing", "rescale_betas_zero_snr", "steps_offset", "beta_schedule"):
            assert d.config[key] == getattr(v, key), (cls.__name__, key)
        torch.testing.assert_close(d.alphas_cumprod.double(), v.alphas_cumprod, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "key,value",
    [
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "flow_prediction"),
        ("timestep_spacing", "even"),
        ("clip_sample", True),
        ("trained_betas", [0.1] * 1000),
        ("thresholding", True),
        ("variance_type", "learned_range"),
    ],
)
def test_from_config_names_the_unsupported_key(key, value):
    with pytest.raises(ValueError, match=rf"scheduler_config.json: {key}="):
        NoiseSchedule.from_config({**SD15_SCHEDULER_CONFIG, key: value}, source="scheduler_config.json")
