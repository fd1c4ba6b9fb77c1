"""The classifier ratio (classifier.py, `drop.py --ratio classifier`) against known answers.

1. Two Gaussians: the logit is the analytic log density ratio on held-out points.
2. The behaviour policy in a perfect model: positives are the data's own states with actions drawn
   anew from the policy that collected them (what rollouts in the true dynamics would hold), so the
   log ratio is 0 on the data; actions from another policy are told apart (the control).
3. The known split: the medium policy against a file of equal parts medium and random data gives
   log 2 on the medium half and far less on the random half.
Then drop.py: the flag trains, logs the ratio's health, and refuses what has no meaning; and
`what_separates` (diagnostics.py's separation) finds the part of (s, a) that tells rollouts from data.
"""

import math

import numpy as np
import pytest
import torch
import tyro
from test_drop import TINY_ANY, hopper_file  # noqa: F401 (fixture)
from test_known_answer import POLICY, medium_random_files

import datasets
import drop
import penalties
from classifier import ClassifierConfig, RatioClassifier, classifier_loss, separation, train_classifier, what_separates
from sac import Actor

torch.set_num_threads(1)
TRANSITIONS = 10_000  # per behaviour policy
STEPS, BATCH = 2000, 256


def fit(model_obs, model_act, data_obs, data_act, steps: int = STEPS, seed: int = 0) -> RatioClassifier:
    """One head trained as drop.py trains it, standardised by the data's statistics."""
    torch.manual_seed(seed)
    inputs = torch.cat([data_obs, data_act], 1)
    classifier = RatioClassifier(data_obs.shape[1], data_act.shape[1], 1, 64, inputs.mean(0), inputs.std(0))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    member = torch.zeros(len(model_obs), dtype=torch.int8)
    train_classifier(classifier, optimizer, model_obs, model_act, member, data_obs, data_act, steps, BATCH)
    return classifier


def test_logit_is_the_log_density_ratio_of_two_gaussians():
    """Model samples N(m1, I), data N(m0, I) in 4 dimensions: log ratio = (m1 - m0).x - (|m1|^2 - |m0|^2) / 2.
    Measured mean absolute error 0.078 on held-out points from both (the log ratio spans about -6 to 6)."""
    generator = torch.Generator().manual_seed(0)
    m0, m1 = torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, -0.5, 0.5, 0.0])
    sample = lambda mean, n: mean + torch.randn(n, 4, generator=generator)
    model, data = sample(m1, 20_000), sample(m0, 20_000)
    classifier = fit(model[:, :3], model[:, 3:], data[:, :3], data[:, 3:])
    held_out = torch.cat([sample(m0, 2000), sample(m1, 2000)])
    truth = held_out @ (m1 - m0) - 0.5 * (m1.dot(m1) - m0.dot(m0))
    with torch.no_grad():
        error = (classifier.logit(held_out[:, :3], held_out[:, 3:])[0] - truth).abs().mean().item()
    print(f"\ntwo Gaussians: mean |logit - log ratio| {error:.3f}")
    assert error < 0.15


@pytest.fixture(scope="module")
def hopper_files(tmp_path_factory):
    medium, _, mixed = medium_random_files(tmp_path_factory.mktemp("classifier"), TRANSITIONS)
    load = lambda path: datasets.load_dataset("hopper-medium-v2", str(path))
    return load(medium), load(mixed)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(x, dtype=torch.float32)


def policy_actions(obs: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(2)
    actor = Actor.from_npz_arrays(dict(np.load(POLICY)))
    with torch.no_grad():
        return actor(obs)[0]


def test_behaviour_policy_in_a_perfect_model_has_log_ratio_zero_on_the_data(hopper_files):
    """Measured: mean |logit| 0.078 on the data; uniform actions instead (the control) 2.37."""
    medium, _ = hopper_files
    obs, act = as_tensor(medium.observations), as_tensor(medium.actions)
    behaviour = fit(obs, policy_actions(obs), obs, act)
    uniform = fit(obs, torch.rand_like(act) * 2 - 1, obs, act)
    with torch.no_grad():
        on_data, control = (
            behaviour.logit(obs, act)[0].abs().mean().item(),
            uniform.logit(obs, act)[0].abs().mean().item(),
        )
    print(f"\nbehaviour policy: mean |logit| on the data {on_data:.3f}; uniform actions (control) {control:.3f}")
    assert on_data < 0.2
    assert control > 1.0


def test_the_medium_policy_against_a_medium_random_mixture_gives_the_known_split(hopper_files):
    """rho_medium / rho_mixture is 2 where only medium data lives and 0 where only random data does.
    Measured: mean logit 0.69 on the medium half (log 2 = 0.69), -15.1 on the random half."""
    medium, mixed = hopper_files
    obs, act = as_tensor(mixed.observations), as_tensor(mixed.actions)
    medium_obs = as_tensor(medium.observations)
    classifier = fit(medium_obs, policy_actions(medium_obs), obs, act)
    with torch.no_grad():
        logit = classifier.logit(obs, act)[0]
    medium_half, random_half = logit[:TRANSITIONS].mean().item(), logit[TRANSITIONS:].mean().item()
    print(f"\nsplit: mean logit {medium_half:.2f} on the medium half, {random_half:.2f} on the random half")
    assert abs(medium_half - math.log(2)) < 0.25
    assert random_half < medium_half - 2.0


def test_each_head_learns_from_its_own_elites_samples():
    """Head 0's positives sit at +2, head 1's at -2, the data at 0: the heads must disagree accordingly."""
    torch.manual_seed(0)
    data = torch.randn(4000, 2)
    model = torch.cat([torch.randn(2000, 2) + 2.0, torch.randn(2000, 2) - 2.0])
    member = torch.cat([torch.zeros(2000), torch.ones(2000)]).to(torch.int8)
    classifier = RatioClassifier(1, 1, 2, 32, torch.zeros(2), torch.ones(2))
    train_classifier(
        classifier,
        torch.optim.Adam(classifier.parameters(), lr=1e-3),
        model[:, :1],
        model[:, 1:],
        member,
        data[:, :1],
        data[:, 1:],
        500,
        128,
    )
    with torch.no_grad():
        logit = classifier.logit(torch.tensor([[2.0], [-2.0]]), torch.tensor([[2.0], [-2.0]]))
    assert logit[0, 0] > 1.0 > logit[0, 1] and logit[1, 1] > 1.0 > logit[1, 0]


def test_loss_is_the_logistic_loss_with_model_samples_as_label_one():
    classifier = RatioClassifier(2, 1, 1, 8, torch.zeros(3), torch.ones(3))
    with torch.no_grad():
        classifier.net.output.bias.fill_(0.5)  # every logit 0.5
    x = torch.randn(1, 10, 3)
    loss = classifier_loss(classifier, x[..., :2], x[..., 2:], x[..., :2], x[..., 2:])
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.5))]))
    assert classifier.ratio(x[0, :, :2], x[0, :, 2:]).allclose(torch.tensor(math.exp(0.5)))


def test_the_classifier_defaults_to_the_dice_heads_width():
    """docs/density-ratio.md: heads 64-64 like the DICE nets, Adam at 1e-3, 256 samples of each class a step. Catches a changed default."""
    assert ClassifierConfig() == ClassifierConfig(hidden=64, lr=1e-3, batch_size=256)


def test_each_step_is_a_balanced_batch_per_head_and_the_mean_loss_is_returned(monkeypatch):
    """Per head and step, batch_size model samples and as many dataset samples (balanced classes, so the logit is
    the log ratio with no prior term); the result is the mean of the steps' losses.

    Catches: unbalanced batches, the last step's loss reported instead of the mean."""
    import classifier as module

    losses, shapes, original = [], [], module.classifier_loss
    monkeypatch.setattr(
        module,
        "classifier_loss",
        lambda c, mo, ma, do, da: (
            shapes.append((mo.shape, ma.shape, do.shape, da.shape))
            or losses.append(original(c, mo, ma, do, da))
            or losses[-1]
        ),
    )
    torch.manual_seed(0)
    classifier = RatioClassifier(3, 2, 2, 8, torch.zeros(5), torch.ones(5))
    member = torch.tensor([0, 1] * 50, dtype=torch.int8)
    result = train_classifier(
        classifier,
        torch.optim.Adam(classifier.parameters(), lr=1e-2),
        torch.randn(100, 3) + 1,
        torch.randn(100, 2),
        member,
        torch.randn(300, 3),
        torch.randn(300, 2),
        steps=6,
        batch_size=16,
    )
    assert shapes == [((2, 16, 3), (2, 16, 2), (2, 16, 3), (2, 16, 2))] * 6
    torch.testing.assert_close(result, torch.stack(losses).detach().mean(0))
    assert not torch.allclose(losses[0], losses[-1])  # it learns, so the mean differs from the last step's


def test_the_logit_does_not_depend_on_the_units_of_s_and_a():
    """Standardised inputs: the same samples in other units (x 100 + 5), with their own statistics, train the same classifier.

    Catches: raw inputs (Adam's steps, the same in every unit, would fit the two differently)."""
    generator = torch.Generator().manual_seed(0)
    model, data = torch.randn(2000, 3, generator=generator) + 1.0, torch.randn(2000, 3, generator=generator)
    logits = []
    for scale, shift in ((1.0, 0.0), (100.0, 5.0)):
        m, d = model * scale + shift, data * scale + shift
        torch.manual_seed(1)
        classifier = RatioClassifier(2, 1, 1, 16, d.mean(0), d.std(0))
        train_classifier(
            classifier,
            torch.optim.Adam(classifier.parameters(), lr=1e-2),
            m[:, :2],
            m[:, 2:],
            torch.zeros(2000, dtype=torch.int8),
            d[:, :2],
            d[:, 2:],
            50,
            64,
        )
        with torch.no_grad():
            logits.append(classifier.logit(m[:200, :2], m[:200, 2:])[0])
    assert logits[0].std() > 0.1
    torch.testing.assert_close(logits[0], logits[1], atol=1e-3, rtol=1e-3)


def test_drop_trains_with_the_classifier_and_logs_the_ratios_health(hopper_file, tmp_path, monkeypatch):
    from test_drop import logged_scalars

    monkeypatch.chdir(tmp_path)
    calls, train = [], penalties.train_classifier
    monkeypatch.setattr(penalties, "train_classifier", lambda *a: calls.append(a) or train(*a))
    buffer_sizes, rollout = [], drop.rollout  # the model buffer's size after each rollout (its last argument)
    monkeypatch.setattr(drop, "rollout", lambda *a: (rollout(*a), buffer_sizes.append(a[-1].size))[0])
    flags = [
        "--ratio",
        "classifier",
        "--classifier.hidden",
        "16",
        "--classifier.lr",
        "3e-3",
        "--classifier.batch-size",
        "32",
    ]
    drop.main(
        tyro.cli(
            drop.Args,
            args=[
                "--env",
                "hopper-medium-v2",
                "--dataset",
                hopper_file,
                *TINY_ANY,
                "--dice-steps",
                "5",
                *flags,
                "--rollout-batch-size",
                "600",
                "--run-name",
                "classifier",
            ],
        )
    )
    # Epoch 2 trains the heads (epoch 1 has no rollouts yet): positives are the model buffer, negatives the data,
    # for the table's dice_steps, with the classifier's own width, learning rate, batch and the ensemble's input statistics.
    data = datasets.load_dataset("hopper-medium-v2", hopper_file)
    [(classifier, optimizer, model_obs, model_act, model_member, data_obs, data_act, steps, batch_size)] = calls
    assert torch.equal(data_obs, torch.as_tensor(data.observations)) and torch.equal(
        data_act, torch.as_tensor(data.actions)
    )
    assert (
        len(model_obs) == buffer_sizes[1] > 1000
    )  # every row of epoch 1's two rollouts of 600 starts, not a sample of them
    assert not (model_act[:, None] == data_act[None]).all(-1).any()  # the policy's actions
    assert set(model_member.tolist()) == {0, 1} and (steps, batch_size) == (5, 32)
    assert optimizer.param_groups[0]["lr"] == 3e-3 and classifier.net.hidden[0].weight.shape[-1] == 16
    checkpoint = torch.load(tmp_path / "runs" / "classifier" / "checkpoint.pt", weights_only=True)
    ensemble = torch.load(checkpoint["dynamics_path"], weights_only=True)["state_dict"]
    assert torch.equal(classifier.input_mean, ensemble["input_mean"]) and torch.equal(
        classifier.input_std, ensemble["input_std"]
    )
    scalars = logged_scalars(str(tmp_path / "runs" / "classifier"))
    assert scalars["penalty/objective"][0] == pytest.approx(math.log(2))  # epoch 1: no rollout yet, ratio 1 everywhere
    assert scalars["penalty/tau_data_mean"][0] == 1.0 and scalars["rollout/penalty_mean"][0] == 0.0
    assert scalars["penalty/objective"][1] != pytest.approx(math.log(2))  # epoch 2 learned from epoch 1's rollouts
    for tag in (
        "penalty/tau_data_mean",
        "rollout/tau_mean",
        "rollout/tau_median",
        "rollout/tau_below_clip",
        "rollout/bonus_fraction",
    ):
        assert len(scalars[tag]) == 2 and all(map(math.isfinite, scalars[tag])), tag
    # diagnostics.py rebuilds the run's classifier heads (its Fig. 2 then reads the classifier's penalty).
    import diagnostics

    run = diagnostics.load_run(str(tmp_path / "runs" / "classifier"))
    saved = torch.load(tmp_path / "runs" / "classifier" / "checkpoint.pt", weights_only=True)["penalty"]["net"]
    assert isinstance(run.penalty.net, RatioClassifier) and torch.equal(
        run.penalty.net.net.output.weight, saved["net.output.weight"]
    )
    # Its separation judges the run's own heads beside the fresh classifiers.
    separated = diagnostics.rollout_separation(run, steps=20, held_out=100, rng=np.random.default_rng(0))
    assert list(separated["classifiers"]) == ["the run's heads", "state and action", "state only", "action only"]
    assert separated["upper_clip"] == 10.0 and separated["held_out"] == 100
    assert all(0.0 <= row["accuracy"] <= 1.0 for row in separated["classifiers"].values())


@pytest.mark.parametrize("argv, words", [
    (["--penalty", "mopo", "--ratio", "classifier"], "--penalty mopo has no ratio"),
    (["--penalty", "none", "--ratio", "classifier"], "--penalty none has no ratio"),
    (["--ratio", "classifier", "--dice-steps", "0"], "at least 1"),
    (["--ratio", "classifier", "--classifier.batch-size", "0"], "at least 1"),
])  # fmt: skip
def test_meaningless_classifier_flags_are_refused_in_one_line(argv, words):
    with pytest.raises(SystemExit, match="^error: ") as error:
        drop.settings(tyro.cli(drop.Args, args=argv), "hopper-medium")
    assert words in str(error.value) and "\n" not in str(error.value)


def test_the_ratio_stays_finite_far_off_the_data():
    """Rollouts far off the data push the logit into the thousands; exp of it would overflow float32 and stop drop.py's run on an inf tau."""
    classifier = RatioClassifier(3, 1, 1, 8, torch.zeros(4), torch.ones(4))
    with torch.no_grad():
        classifier.net.output.bias.fill_(200.0)
    ratio = classifier.ratio(torch.zeros(5, 3), torch.zeros(5, 1))
    assert torch.isfinite(ratio).all() and torch.allclose(ratio, torch.tensor(math.exp(50.0)))
    with torch.no_grad():
        classifier.net.output.bias.fill_(-3.0)
        classifier.net.output.weight.zero_()
    assert torch.allclose(
        classifier.ratio(torch.zeros(5, 3), torch.zeros(5, 1)), torch.tensor(math.exp(-3.0))
    )  # no floor: small ratios pass unchanged


@pytest.mark.parametrize("differ_in", ["state", "action"])
def test_what_separates_finds_the_part_of_the_input_that_differs(differ_in):
    """Rollouts that differ from the data only in their actions are told apart from a alone, and s alone is
    chance (0.5); and the other way round. The best possible accuracy is Phi(|shift| / 2) = 0.983; measured 0.984-0.985, and 0.50-0.51."""
    torch.manual_seed(0)
    n, shift = 6000, torch.tensor([3.0, -3.0])
    data_obs, data_act, model_obs, model_act = (
        torch.randn(n, 2),
        torch.randn(n, 2),
        torch.randn(n, 2),
        torch.randn(n, 2),
    )
    if differ_in == "state":
        model_obs = model_obs + shift
    else:
        model_act = model_act + shift
    results = what_separates(
        model_obs,
        model_act,
        data_obs,
        data_act,
        torch.zeros(4),
        torch.ones(4),
        ClassifierConfig(),
        1000,
        2000,
        upper_clip=10.0,
    )
    print(f"\n{differ_in}: " + ", ".join(f"{name} {row['accuracy']:.3f}" for name, row in results.items()))
    same = "action only" if differ_in == "state" else "state only"
    assert results["state and action"]["accuracy"] > 0.95 and results[f"{differ_in} only"]["accuracy"] > 0.95
    assert abs(results[same]["accuracy"] - 0.5) < 0.05


def test_separation_is_the_balanced_accuracy_and_the_share_at_the_upper_clip():
    model_logit = torch.tensor([3.0, 2.0, -1.0, 0.5])  # 3 of 4 called rollouts; log 10 = 2.30: 1 of 4 at the clip
    data_logit = torch.tensor([-1.0, 1.0])  # 1 of 2 called data
    result = separation(model_logit, data_logit, upper_clip=10.0)
    assert result["accuracy"] == pytest.approx(0.5 * (0.75 + 0.5)) and result["rollout_above_clip"] == 0.25
    assert result["median_logit_rollout"] == 0.5 and math.isnan(
        separation(model_logit, data_logit, None)["rollout_above_clip"]
    )
