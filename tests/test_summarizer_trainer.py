import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch

import relsum_core.trainers.summarizer as summarizer_mod
from relsum_core.data import Judgment, load_dataset
from relsum_core.losses import grpo_loss
from relsum_core.policy import TRAINING_RECORD, Rollouts, sample
from relsum_core.rewards import COMPONENTS
from relsum_core.trainers.summarizer import (
    KL_GAIN,
    SummarizerConfig,
    SummarizerTrainer,
    _split_products,
    adapt_beta,
    run_sources,
    train_summarizer,
)

from conftest import rel_err

PRODUCTS = [
    ("p1", "red cotton shirt", ["size large", "pack of two"]),
    ("p2", "blue cotton shirt", ["size small"]),
    ("p3", "steel water bottle", ["kids", "pack of two"]),
    ("p4", "organic dog food", ["chicken"]),
    ("p5", "kids water bottle", ["blue", "steel"]),
    ("p6", "dog food chicken", ["organic", "pack"]),
]
JUDGMENTS = [  # query_id, query, product_id, grade
    ("q1", "red shirt", "p1", 3), ("q1", "red shirt", "p2", 1),
    ("q2", "water bottle", "p3", 3), ("q2", "water bottle", "p5", 2),
    ("q3", "dog food", "p4", 3), ("q3", "dog food", "p6", 0),
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    with open(d / "products.jsonl", "w") as f:
        for pid, title, bullets in PRODUCTS:
            f.write(json.dumps({"product_id": pid, "title": title, "description": "",
                                "bullet_points": "\n".join(bullets)}) + "\n")
    with open(d / "judgments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["query_id", "query", "product_id", "grade"])
        w.writerows(JUDGMENTS)
    return d


def _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, **kw):
    base = dict(out=str(tmp_path / "run"), ranker=str(tiny_ranker_dir), policy=str(tiny_policy_dir),
                data=str(data_dir), steps=2, products_per_step=2, group_size=3, budget=6,
                max_product_tokens=16, val_fraction=0.34, eval_products=2, eval_every=1, save_every=1,
                lr=1e-3, warmup_steps=1, beta=0.1, progress=False, device="cpu", precision="fp32")
    base.update(kw)
    return SummarizerConfig(**base)


def test_grpo_run_logs_every_component_and_checkpoints(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    cfg = _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir)
    last = train_summarizer(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    train = [r for r in rows if r["event"] == "train"]
    evals = [r for r in rows if r["event"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and len(evals) == 3  # before training and after each step
    for key in ("reward", "reward_relevance", "reward_ranking", "reward_budget", "reward_faithfulness", "kl",
                "entropy", "clip_fraction", "summary_tokens", "new_tokens_per_s", "time_sample_s",
                "time_reward_s", "time_update_s", "grad_norm"):
        assert key in last and last[key] == last[key], key  # present and not NaN
    assert evals[-1]["samples"] and all("summary" in s for s in evals[-1]["samples"])
    ckpt = tmp_path / "run" / "checkpoint"
    assert (ckpt / "trainer.pt").is_file() and (ckpt / "config.json").is_file()
    # what evaluate keeps out of held-out scores: the training products, by id and title
    titles = {p: t for p, t, _ in PRODUCTS}
    record = json.loads((ckpt / TRAINING_RECORD).read_text())
    trainer = SummarizerTrainer(cfg)
    assert record["train_products"] == {p: titles[p] for p in trainer.train_ids}
    assert not set(record["train_products"]) & set(trainer.val_ids) and record["step"] == 2
    # the prompt's budgets, which summarize and evaluate default to / warn about
    from relsum_core.policy import read_prompt_settings

    assert read_prompt_settings(ckpt) == {"budget": 6, "max_product_tokens": 16} == {
        k: record[k] for k in ("budget", "max_product_tokens")}
    # a run from this checkpoint on another split adds its products to the base policy's
    other = SummarizerTrainer(_cfg(tmp_path / "b", data_dir, str(ckpt), tiny_ranker_dir, split_seed=1))
    assert set(other.train_ids) != set(trainer.train_ids)
    assert other.trained_products == {p: titles[p] for p in set(trainer.train_ids) | set(other.train_ids)}
    # the first update moves the policy away from the reference: KL > 0 at step 2
    assert train[1]["kl"] > 0


def test_time_bound_stops_after_a_step_and_saves(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    cfg = _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=5, eval_every=10, save_every=10,
               max_minutes=0.0)
    train_summarizer(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1]
    assert [r["step"] for r in rows if r["event"] == "eval"] == [0, 1]  # a final eval at the stop
    assert (tmp_path / "run" / "checkpoint" / "trainer.pt").is_file()


def test_more_products_a_step_than_training_products_is_an_error(tmp_path, data_dir, tiny_policy_dir,
                                                                 tiny_ranker_dir):
    with pytest.raises(ValueError, match="products_per_step=6 is more than the 4 training products"):
        SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, products_per_step=6))


def test_cli_rerun_of_a_finished_run_says_so(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, capsys):
    from relsum_core.cli import main

    args = ["train", "--ranker", str(tiny_ranker_dir), "--policy", str(tiny_policy_dir),
            "--data", str(data_dir), "--out", str(tmp_path / "run"), "--steps", "1",
            "--products-per-step", "2", "--group-size", "3",
            "--budget", "6", "--max-product-tokens", "16", "--val-fraction", "0.34", "--eval-products", "2",
            "--lr", "1e-3", "--warmup-steps", "1", "--beta", "0.1", "--device", "cpu", "--precision", "fp32",
            "--no-progress"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    eval_rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                 if json.loads(x)["event"] == "eval"]
    assert "step 1: training reward " in printed  # the samples', told apart from the greedy one
    assert f"validation reward {eval_rows[-1]['reward']:.4f} (greedy, step 1)" in printed
    assert f"checkpoint in {tmp_path / 'run' / 'checkpoint'}" in printed
    assert main(args) == 0
    assert "is at step 1, not below --steps 1: nothing to train" in capsys.readouterr().out


def test_validation_products_never_train(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    t = SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir))
    assert t.val_ids and not set(t.val_ids) & set(t.train_ids)
    assert set(t.train_ids) | set(t.val_ids) == {p[0] for p in PRODUCTS}


def test_resume_gives_the_same_next_step(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    straight = SummarizerTrainer(_cfg(tmp_path / "a", data_dir, tiny_policy_dir, tiny_ranker_dir, steps=2))
    straight.train()
    first = SummarizerTrainer(_cfg(tmp_path / "b", data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1))
    first.train()
    # a crash after step 2 was logged but before it was saved, and one cut off mid-line
    with open(tmp_path / "b" / "run" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"event": "train", "step": 2, "reward": 9.0}) + '\n{"event": "ev')
    resumed = SummarizerTrainer(_cfg(tmp_path / "b", data_dir, tiny_policy_dir, tiny_ranker_dir, steps=2))
    assert resumed.step == 1
    resumed.train()
    for (name, a), b in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    rows = [json.loads(x) for x in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2]  # step 2 once, the resumed one
    assert [r["step"] for r in rows if r["event"] == "eval"] == [0, 1, 2]
    assert all(r["reward"] != 9.0 for r in rows if r["event"] == "train")


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grad_accum_matches_one_batch(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, loss_type):
    kw = dict(loss_type=loss_type, entropy_coef=0.05)
    one = SummarizerTrainer(_cfg(tmp_path / "a", data_dir, tiny_policy_dir, tiny_ranker_dir, grad_accum=1,
                                 **kw))
    two = SummarizerTrainer(_cfg(tmp_path / "b", data_dir, tiny_policy_dir, tiny_ranker_dir, grad_accum=2,
                                 **kw))
    g1, g2 = _record_grads(one), _record_grads(two)
    m1, m2 = one.train_step(), two.train_step()
    assert m1["reward"] == pytest.approx(m2["reward"])
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-4, abs=1e-6)  # the logged loss too
    # Gradients, not weights: AdamW's first step moves a weight by ~lr * sign(grad), so float noise on
    # a gradient entry near zero can move one weight by up to 2 * lr (seen on an AMX Xeon: 1 of 20k).
    assert g1.keys() == g2.keys() and sum(float(g.abs().sum()) for g in g1.values()) > 0
    for name, g in g1.items():
        assert rel_err(g2[name], g) < 1e-4, name


def test_dpo_pairs_best_and_worst_of_each_group(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    t = SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, algo="dpo", group_size=4,
                               temperature=1.5))
    before = [p.detach().clone() for p in t.policy.parameters()]
    m = t.train_step()
    assert 1 <= m["pairs"] <= 2
    assert {"reward_accuracy", "reward_margin", "loss"} <= set(m)
    # policy and reference agree before the first update: every implicit reward is 0, loss log 2
    assert m["loss"] == pytest.approx(0.6931, abs=1e-3) and m["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, t.policy.parameters()))


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_update_moves_towards_the_better_rewarded_summary(tmp_path, data_dir, tiny_policy_dir,
                                                         tiny_ranker_dir, algo):
    # One product, three summaries rewarded 1 / 0 / -1: a small step along the update's gradient must
    # raise the best summary's log-prob relative to the worst's (a sign slip in the advantages or a
    # swapped DPO pair lowers it).
    import numpy as np

    from relsum_core.losses import sequence_logprob
    from relsum_core.policy import completion_logprobs, sample
    from relsum_core.rewards import COMPONENTS

    t = SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, algo=algo,
                               products_per_step=1, group_size=3, beta=0.0, advantage="total",
                               temperature=1.5))
    pids = t._step_products(0) * 3
    r = sample(t.sampler, t.tok, t._prompts(pids), max_new_tokens=6, temperature=1.5, seed=[11, 12, 13])
    assert len(set(r.texts)) == 3  # three different summaries to prefer between
    total = np.array([1.0, 0.0, -1.0])
    rewards = {"total": total, **{c: np.zeros(3) for c in COMPONENTS}}

    def seq_logp():
        with torch.no_grad():
            return sequence_logprob(completion_logprobs(t.policy, r, temperature=1.5), r.completion_mask)

    before = seq_logp()
    t.opt.zero_grad(set_to_none=True)
    (t._grpo_update if algo == "grpo" else t._dpo_update)(r, rewards)
    with torch.no_grad():
        for p in t.policy.parameters():
            if p.grad is not None:
                p -= 1e-3 * p.grad  # plain gradient descent on the update's loss
    moved = seq_logp() - before
    assert float(moved[0] - moved[2]) > 0, moved


def test_adapt_beta_moves_towards_the_kl_target_by_a_clipped_step():
    assert adapt_beta(0.04, 0.10, 0.10) == pytest.approx(0.04)
    assert adapt_beta(0.04, 0.11, 0.10) == pytest.approx(0.04 * (1 + KL_GAIN * 0.1))
    assert adapt_beta(0.04, 0.09, 0.10) == pytest.approx(0.04 * (1 - KL_GAIN * 0.1))
    # far off target: the error is clipped at +-20%, so one noisy step moves beta by at most 2%
    assert adapt_beta(0.04, 5.0, 0.10) == pytest.approx(0.04 * (1 + KL_GAIN * 0.2))
    assert adapt_beta(0.04, 0.0, 0.10) == pytest.approx(0.04 * (1 - KL_GAIN * 0.2))
    assert adapt_beta(0.04, 0.0, 0.10, floor=0.04) == 0.04  # never weaker than the configured beta


def test_kl_target_adapts_beta_logs_it_and_resume_restores_it(tmp_path, data_dir, tiny_policy_dir,
                                                              tiny_ranker_dir):
    kw = dict(kl_target=1e-6, steps=3)
    straight = SummarizerTrainer(_cfg(tmp_path / "a", data_dir, tiny_policy_dir, tiny_ranker_dir, **kw))
    straight.train()
    rows = [json.loads(x) for x in (tmp_path / "a" / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["event"] == "train"]
    assert train[0]["beta"] == pytest.approx(0.1)  # the weight step 1's loss used: the start value
    expected = 0.1
    for r in train:
        assert r["beta"] == pytest.approx(expected)
        expected = adapt_beta(expected, r["kl"], 1e-6, floor=0.1)
    assert straight.beta == pytest.approx(expected)
    # step 1 samples from the reference itself (KL 0, below target: beta stays at its floor, the
    # configured 0.1); step 2's KL is above the tiny target: beta rises by the clipped step
    assert train[1]["beta"] == pytest.approx(0.1)
    assert train[2]["beta"] == pytest.approx(0.1 * (1 + KL_GAIN * 0.2))
    first = SummarizerTrainer(_cfg(tmp_path / "b", data_dir, tiny_policy_dir, tiny_ranker_dir,
                                   **{**kw, "steps": 2}))
    first.train()
    resumed = SummarizerTrainer(_cfg(tmp_path / "b", data_dir, tiny_policy_dir, tiny_ranker_dir, **kw))
    assert resumed.beta == pytest.approx(first.beta) and resumed.beta != 0.1
    resumed.train()
    assert resumed.beta == pytest.approx(straight.beta)
    for (name, a), b in zip(straight.policy.named_parameters(), resumed.policy.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="algo must be"):
        SummarizerConfig(out=str(tmp_path), ranker="x", algo="ppo")
    for algo in ("dpo", "grpo"):  # a group of one has no advantage and no pair
        with pytest.raises(ValueError, match=f"{algo} needs group_size >= 2"):
            SummarizerConfig(out=str(tmp_path), ranker="x", algo=algo, group_size=1)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        SummarizerConfig(out=str(tmp_path), ranker="x", temperature=0.0)
    with pytest.raises(ValueError, match="budget must be > 0"):
        SummarizerConfig(out=str(tmp_path), ranker="x", budget=0)
    with pytest.raises(ValueError, match="kl_target must be > 0"):
        SummarizerConfig(out=str(tmp_path), ranker="x", kl_target=0.0)
    with pytest.raises(ValueError, match="starting beta > 0"):
        SummarizerConfig(out=str(tmp_path), ranker="x", kl_target=0.1, beta=0.0)
    with pytest.raises(ValueError, match="algo='grpo'"):
        SummarizerConfig(out=str(tmp_path), ranker="x", kl_target=0.1, algo="dpo")
    with pytest.raises(ValueError, match="divisible by grad_accum"):
        SummarizerConfig(out=str(tmp_path), ranker="x", products_per_step=3, group_size=3, grad_accum=2)
    with pytest.raises(ValueError, match="precision must be one of auto, bf16, fp32, got 'fp16'"):
        SummarizerConfig(out=str(tmp_path), ranker="x", precision="fp16")
    for bad, message in [(dict(eval_every=0), "eval_every must be >= 1"),
                         (dict(save_every=0), "save_every must be >= 1"),
                         (dict(max_product_tokens=0), "max_product_tokens must be >= 1"),
                         (dict(eval_products=-1), "eval_products must be >= 0"),
                         (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
                         (dict(top_p=2.0), r"top_p must be in \(0, 1\]"),
                         (dict(beta=-0.1), "beta must be >= 0")]:
        with pytest.raises(ValueError, match=message):
            SummarizerConfig(out=str(tmp_path), ranker="x", **bad)


def test_resume_refuses_other_settings_and_a_fresh_run_another_runs_log(tmp_path, data_dir, tiny_policy_dir,
                                                                        tiny_ranker_dir):
    SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1,
                           eval_products=0)).train()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows] == ["config", "train"]  # eval_products 0: no empty eval rows
    with pytest.raises(ValueError, match=r"other settings \(algo 'grpo' -> 'dpo', lr 0.001 -> 0.5\)"):
        SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=2, algo="dpo",
                               lr=0.5))
    # more steps, other bounds and watching: a resume
    assert SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=3, eval_every=5,
                                  eval_products=0, max_minutes=9.0)).step == 1
    # the same command after a crash before its first checkpoint starts again; another one is refused
    crashed = tmp_path / "crashed"
    same = dict(steps=1, eval_products=0)
    SummarizerTrainer(_cfg(crashed, data_dir, tiny_policy_dir, tiny_ranker_dir, **same)).train()
    shutil.rmtree(crashed / "run" / "checkpoint")
    SummarizerTrainer(_cfg(crashed, data_dir, tiny_policy_dir, tiny_ranker_dir, **same))
    with pytest.raises(ValueError, match=r"holds the metrics of a run with other settings or models "
                                         r"\(settings lr 0.001 -> 0.5\)"):
        SummarizerTrainer(_cfg(crashed, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1, lr=0.5))
    other = tmp_path / "ranker_run"
    other.mkdir()
    (other / "metrics.jsonl").write_text('{"event": "split"}\n{"event": "train", "step": 1}\n')
    with pytest.raises(ValueError, match="holds another run's metrics"):
        SummarizerTrainer(_cfg(other, data_dir, tiny_policy_dir, tiny_ranker_dir, out=str(other)))


def test_bf16_trains_fp32_weights_and_samples_from_a_refreshed_bf16_copy(tmp_path, data_dir, tiny_policy_dir,
                                                                          tiny_ranker_dir):
    t = SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, precision="bf16"))
    assert t.sampler is not t.policy
    grads = _record_grads(t)
    before = {n: p.detach().clone() for n, p in t.policy.named_parameters()}
    row = t.train_step()
    # the policy equals the reference at the first step, and both forwards ran alike: KL exactly 0
    assert row["kl"] == 0.0
    assert all(g.dtype == torch.float32 for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert all(p.dtype == torch.float32 for p in t.policy.parameters())
    assert all(v.dtype == torch.float32
               for st in t.opt.state.values() for v in st.values() if v.is_floating_point())
    moved = [n for n, p in t.policy.named_parameters() if not torch.equal(p, before[n])]
    assert moved  # the step changed the fp32 weights ...
    sampler = dict(t.sampler.named_parameters())
    for n, p in t.policy.named_parameters():  # ... and the sampler holds them, rounded to bf16
        assert sampler[n].dtype == torch.bfloat16 and torch.equal(sampler[n], p.detach().bfloat16()), n
    assert all(b.dtype == torch.float32 for b in t.sampler.buffers() if b.is_floating_point())


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_train_dtype_is_logged(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, precision):
    from relsum_core.precision import resolve_precision

    train_summarizer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, precision=precision, steps=1))
    config = json.loads(open(tmp_path / "run" / "metrics.jsonl").readline())
    assert config["event"] == "config" and config["precision"] == precision
    assert config["train_dtype"] == str(resolve_precision(precision, "cpu")).removeprefix("torch.")
    if config["train_dtype"] == "float32":
        t = SummarizerTrainer(_cfg(tmp_path / "again", data_dir, tiny_policy_dir, tiny_ranker_dir,
                                   precision=precision))
        assert t.sampler is t.policy  # no copy in fp32


def test_query_split_follows_split_seed_not_seed(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    from relsum_core.data import load_dataset, split_queries

    _, judgments = load_dataset(data_dir)
    queries = sorted({j.query_id for j in judgments})
    for seed, split_seed in ((0, 0), (4, 0), (0, 1), (4, 2)):  # seed 4 alone would pick another query
        t = SummarizerTrainer(_cfg(tmp_path / f"{seed}-{split_seed}", data_dir, tiny_policy_dir,
                                   tiny_ranker_dir, seed=seed, split_seed=split_seed))
        _, val_q = split_queries(queries, val_fraction=0.34, seed=split_seed)  # as train-ranker splits
        assert t.val_ids == sorted({j.product_id for j in judgments if j.query_id in val_q})
        assert not set(t.train_ids) & set(t.val_ids)


def _record_grads(trainer) -> dict:
    """The (clipped) gradients the optimizer step sees, by parameter name."""
    grads, step = {}, trainer.opt.step

    def recording_step(*a, **k):
        grads.update({n: p.grad.detach().clone() for n, p in trainer.policy.named_parameters()})
        return step(*a, **k)

    trainer.opt.step = recording_step
    return grads


def _ddp_worker(rank, world, store, cfg_kw, out_file):
    import torch.distributed as dist

    # A file store instead of a TCP port: no race for a free port between parallel test runs.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        t = SummarizerTrainer(SummarizerConfig(**cfg_kw))
        grads = _record_grads(t)
        t.train_step()
        if rank == 0:
            torch.save(grads, out_file)
        t.close()  # drops DDP; the group is the test's to leave
        assert dist.is_initialized()
        dist.barrier()  # neither process tears down its connections while the other still uses them
    finally:
        dist.destroy_process_group()


def _torchrun_worker(rank, world, port, cfg_kw, flag_dir):
    import torch.distributed as dist

    # what torchrun sets; the trainer joins the group itself, as under `torchrun relsum train`
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    train_summarizer(SummarizerConfig(**cfg_kw))
    with open(os.path.join(flag_dir, f"rank{rank}"), "w") as f:
        f.write(str(dist.is_initialized()))


def test_torchrun_run_leaves_the_group_it_joined(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port (the race with another process taking it is tiny)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg_kw = vars(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1))
    mp.spawn(_torchrun_worker, args=(2, port, cfg_kw, str(tmp_path)), nprocs=2, join=True)
    # a group left alive (or a DDP module left to interpreter shutdown) can abort the process at exit
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["False", "False"]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1]
    assert rows[0]["world_size"] == 2 and (tmp_path / "run" / "checkpoint" / "trainer.pt").is_file()


def test_readme_torchrun_command_runs_and_exits_cleanly(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    import subprocess
    import sys

    # the README's data-parallel line (torchrun -m relsum_core.cli train), on the tiny models
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "relsum_core.cli", "train", "--ranker", str(tiny_ranker_dir),
           "--policy", str(tiny_policy_dir), "--data", str(data_dir), "--out", str(out),
           "--steps", "1", "--products-per-step", "2", "--group-size", "2", "--budget", "4",
           "--max-product-tokens", "16", "--eval-products", "2",
           "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 1: training reward") == 1  # rank 0 reports; both processes exited 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows[0]["world_size"] == 2 and [r["step"] for r in rows if r["event"] == "train"] == [1]


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_two_process_gloo_step_equals_one_process(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, algo):
    import torch.multiprocessing as mp

    kw = dict(algo=algo, products_per_step=2, group_size=3, temperature=1.5)
    single = SummarizerTrainer(_cfg(tmp_path / "one", data_dir, tiny_policy_dir, tiny_ranker_dir, **kw))
    grads = _record_grads(single)
    single.train_step()
    cfg_kw = vars(_cfg(tmp_path / "two", data_dir, tiny_policy_dir, tiny_ranker_dir, **kw))
    out_file = tmp_path / "rank0.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), cfg_kw, str(out_file)), nprocs=2, join=True)
    two = torch.load(out_file)
    assert two.keys() == grads.keys()
    # Float noise only (different batch shapes in the sampler and the ranker): a wrong loss scale
    # or a missing all-reduce shows up as an error of order 1.
    for name, g in grads.items():
        assert rel_err(two[name], g) < 1e-3, name
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0  # a real gradient, not zeros


def test_product_split_keeps_one_query_text_on_one_side():
    from relsum_core.data import Judgment
    from relsum_core.trainers.summarizer import _split_products

    judgments = [Judgment(f"q{i}", f"query {i}", f"p{i}", 3) for i in range(10)]
    judgments.append(Judgment("dup", "Query 4", "p-dup", 3))
    for seed in range(8):
        train, val = _split_products(judgments, SummarizerConfig(out="x", ranker="r", split_seed=seed))
        assert ("p4" in val) == ("p-dup" in val) and not set(train) & set(val)


def test_resume_refuses_a_checkpoint_that_trained_on_other_products(tmp_path, data_dir, tiny_policy_dir,
                                                                    tiny_ranker_dir):
    cfg = _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=3, max_minutes=0.0)
    train_summarizer(cfg)
    record_file = tmp_path / "run" / "checkpoint" / TRAINING_RECORD
    SummarizerTrainer(cfg)  # its own record: resumes
    record = json.loads(record_file.read_text())
    record["train_products"]["p-elsewhere"] = "a product of another split"
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"trained on other products than this run's split gives \(1 differ"):
        SummarizerTrainer(cfg)
    # the same ids under another title: named too
    del record["train_products"]["p-elsewhere"]
    retitled = sorted(record["train_products"])[0]
    record["train_products"][retitled] = "another title"
    record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"\(1 differ, e.g. \['{retitled}'\]\)"):
        SummarizerTrainer(cfg)



def test_resume_follows_the_models_and_data_not_their_path_strings(tmp_path, data_dir, tiny_policy_dir,
                                                                   tiny_ranker_dir, monkeypatch):
    ranker, policy = tmp_path / "ranker", tmp_path / "policy"
    shutil.copytree(tiny_ranker_dir, ranker)
    shutil.copytree(tiny_policy_dir, policy)
    one = dict(steps=1, eval_products=0)
    SummarizerTrainer(_cfg(tmp_path, data_dir, policy, ranker, **one)).train()
    # the same models and data under other path strings (a symlink, a relative path, a copy): a
    # resume, also with another grad_accum (it only splits the step's batch)
    (tmp_path / "link").symlink_to(ranker)
    monkeypatch.chdir(tmp_path)
    relative_data = os.path.relpath(data_dir, tmp_path)
    assert SummarizerTrainer(_cfg(tmp_path, relative_data, policy, tmp_path / "link", steps=2)).step == 1
    (tmp_path / "policy_link").symlink_to(policy)  # the base policy too
    assert SummarizerTrainer(_cfg(tmp_path, data_dir, tmp_path / "policy_link", ranker, steps=2)).step == 1
    copied = tmp_path / "data_copy"
    shutil.copytree(data_dir, copied)
    assert SummarizerTrainer(_cfg(tmp_path, copied, policy, ranker, grad_accum=2, **one)).step == 1
    # edited grades in the data the run trains on: refused
    judgments = copied / "judgments.csv"
    lines = judgments.read_text().splitlines()
    head, first = lines[0], lines[1].split(",")
    first[-1] = "0" if first[-1] != "0" else "3"
    judgments.write_text("\n".join([head, ",".join(first), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="the data's judgments or product texts differ"):
        SummarizerTrainer(_cfg(tmp_path, copied, policy, ranker, **one))

    # a plain copy (cp -r: new file times) of the same weights resumes
    shutil.copytree(ranker, tmp_path / "ranker_copy", copy_function=shutil.copy)
    assert SummarizerTrainer(_cfg(tmp_path, data_dir, policy, tmp_path / "ranker_copy", **one)).step == 1

    def rewrite(folder):  # what train-ranker --overwrite or a continued run does to a model folder
        from safetensors.torch import load_file, save_file

        w = next(folder.glob("*.safetensors"))
        tensors = load_file(w)
        name = sorted(tensors)[0]
        tensors[name] = tensors[name] + 0.5
        save_file(tensors, w, metadata={"format": "pt"})

    rewrite(ranker)
    with pytest.raises(ValueError, match=r"other models or data: the ranker's weights at .*ranker differ"):
        SummarizerTrainer(_cfg(tmp_path, data_dir, policy, ranker, **one))
    # a checkpoint from before the sources were recorded compares the path strings, as it did
    state_file = tmp_path / "run" / "checkpoint" / "trainer.pt"
    state = torch.load(state_file, weights_only=False)
    del state["sources"]
    torch.save(state, state_file)
    assert SummarizerTrainer(_cfg(tmp_path, data_dir, policy, ranker, **one)).step == 1
    with pytest.raises(ValueError, match=r"other settings \(ranker "):
        SummarizerTrainer(_cfg(tmp_path, data_dir, policy, tmp_path / "link", **one))
    # a record from before the data's digest (its path then): the digest is not compared, the path is
    state["sources"] = {**run_sources(_cfg(tmp_path, data_dir, policy, ranker), *load_dataset(data_dir)),
                        "data": str(data_dir)}
    del state["sources"]["data_digest"]
    torch.save(state, state_file)
    assert SummarizerTrainer(_cfg(tmp_path, data_dir, policy, tmp_path / "link", **one)).step == 1
    with pytest.raises(ValueError, match=r"other settings \(data "):
        SummarizerTrainer(_cfg(tmp_path, relative_data, policy, ranker, **one))
    # a fresh checkpoint again records them; then the base policy (the KL reference) rewritten: refused
    shutil.rmtree(tmp_path / "run")
    SummarizerTrainer(_cfg(tmp_path, data_dir, policy, ranker, **one)).train()
    rewrite(policy)
    with pytest.raises(ValueError, match=r"the base policy's weights at .*policy differ"):
        SummarizerTrainer(_cfg(tmp_path, data_dir, policy, ranker, **one))


# ---------------------------------------------------------------- from mutation testing
def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _group_rollouts(t, seeds, budget=6, temperature=1.5):
    """Rollouts of the step-0 products, ``group_size`` consecutive rows per product."""
    pids = [p for p in t._step_products(0) for _ in range(t.cfg.group_size)]
    return sample(
        t.sampler, t.tok, t._prompts(pids), max_new_tokens=budget, temperature=temperature, seed=seeds
    )


def _ragged(r: Rollouts, keep: list[int]) -> Rollouts:
    """The rollouts with row i cut to its first keep[i] completion tokens (mask 0 after them)."""
    mask = r.completion_mask.clone()
    for i, k in enumerate(keep):
        mask[i, k:] = 0
    assert (mask.sum(1) > 0).all() and (mask.sum(1) != r.completion_mask.sum(1)).any()
    return Rollouts(r.prompt_ids, r.prompt_mask, r.completion_ids, mask, r.texts)


def _rewards(total):
    total = np.asarray(total, dtype=np.float64)
    return {"total": total, **{c: np.zeros_like(total) for c in COMPONENTS}}


# ===================================================================== config validation
# target: tests/test_summarizer_trainer.py (next to test_bad_config)
# kills: c05 (steps dropped from the >= 1 checks), c06 (products_per_step / grad_accum dropped),
#        c07 (the grad_accum divisibility rule applied to dpo too)
def test_bad_config_counts_must_be_positive(tmp_path):
    for name in ("steps", "products_per_step", "grad_accum", "group_size"):
        with pytest.raises(ValueError, match=f"{name} must be >= 1|needs group_size >= 2"):
            SummarizerConfig(out=str(tmp_path), ranker="x", **{name: 0})


def test_dpo_splits_its_pairs_so_grad_accum_need_not_divide_the_rollouts(tmp_path):
    # dpo splits the step's pairs with array_split: only grpo's equal micro-batches need divisibility
    SummarizerConfig(
        out=str(tmp_path), ranker="x", algo="dpo", products_per_step=3, group_size=3, grad_accum=2
    )


# ===================================================================== product split / eval set
# target: tests/test_summarizer_trainer.py (next to test_product_split_keeps_one_query_text_on_one_side)
# kills: s01 (train -= val dropped), s02 (no error when no product is left to train on)
def test_product_judged_for_a_validation_query_never_trains():
    judgments = [Judgment(f"q{i}", f"query {i}", f"p{i}", 3) for i in range(6)]
    judgments += [Judgment(f"q{i}", f"query {i}", "shared", 2) for i in range(6)]  # judged for every query
    for seed in range(4):
        train, val = _split_products(judgments, SummarizerConfig(out="x", ranker="r", split_seed=seed))
        assert "shared" in val and "shared" not in train and not set(train) & set(val)
    only_shared = [Judgment(f"q{i}", f"query {i}", "shared", 2) for i in range(4)]
    with pytest.raises(ValueError, match="no training products after the query split"):
        _split_products(only_shared, SummarizerConfig(out="x", ranker="r"))


# kills: s03 (products_per_step equal to the training products refused), s04 (eval draw seeded by
#        --seed), s05 (eval_products above the validation products not capped)
def test_step_may_take_every_training_product_and_the_eval_set_is_fixed(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir
):
    t = SummarizerTrainer(
        _cfg(
            tmp_path / "all",
            data_dir,
            tiny_policy_dir,
            tiny_ranker_dir,
            products_per_step=4,
            eval_products=50,
        )
    )
    assert len(t.train_ids) == 4 and sorted(t._step_products(0)) == t.train_ids
    assert t.eval_ids == t.val_ids  # more asked for than there are: all of them, once
    # the evaluation products do not move with --seed (runs of several seeds compare on one set)
    picked = {
        tuple(
            SummarizerTrainer(
                _cfg(tmp_path / f"s{s}", data_dir, tiny_policy_dir, tiny_ranker_dir, seed=s, eval_products=1)
            ).eval_ids
        )
        for s in range(6)
    }
    assert len(picked) == 1


# ===================================================================== step draws and rollouts
# target: tests/test_summarizer_trainer.py
# kills: s06 / s07 (every step draws the same products), t01 (rollout seeds ignore the step),
#        t02 (top_p not passed to the sampler), t03 (sampling past the budget)
def test_each_step_draws_its_own_products_and_seeds_and_samples_as_configured(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, monkeypatch
):
    t = SummarizerTrainer(
        _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, top_p=0.9, temperature=1.3)
    )
    draws = [t._step_products(s) for s in range(12)]
    assert len({tuple(sorted(d)) for d in draws}) > 1 and all(len(set(d)) == 2 for d in draws)
    again = SummarizerTrainer(
        _cfg(tmp_path / "again", data_dir, tiny_policy_dir, tiny_ranker_dir, top_p=0.9, temperature=1.3)
    )
    assert [again._step_products(s) for s in range(12)] == draws  # what a resume relies on
    calls = []
    real = summarizer_mod.sample

    def spy(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(summarizer_mod, "sample", spy)
    t.train_step()
    t.train_step()
    s1, s2 = calls[0]["seed"], calls[1]["seed"]
    assert len(set(s1)) == len(s1) == 6 and not set(s1) & set(s2)  # a seed per row, new each step
    for k in calls:
        assert (k["top_p"], k["temperature"], k["max_new_tokens"]) == (0.9, 1.3, 6)


# ===================================================================== optimizer and schedule
# target: tests/test_summarizer_trainer.py
# kills: m04 (weight_decay ignored), m05 (warmup factor s / w: the first step at lr 0),
#        m06 (warmup factor not capped at 1), m07 (warmup_steps 0 divides by zero),
#        t06 (the scheduler never stepped)
def test_warmup_then_constant_lr_and_weight_decay(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    t = SummarizerTrainer(
        _cfg(
            tmp_path,
            data_dir,
            tiny_policy_dir,
            tiny_ranker_dir,
            warmup_steps=3,
            weight_decay=0.05,
            eval_products=0,
        )
    )
    assert t.opt.param_groups[0]["weight_decay"] == 0.05
    used, step = [], t.opt.step

    def recording_step(*a, **k):
        used.append(t.opt.param_groups[0]["lr"])
        return step(*a, **k)

    t.opt.step = recording_step
    logged = [t.train_step()["lr"] for _ in range(4)]
    assert used == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3])
    assert logged == used  # a row's lr is the one its step used, not the next step's
    none = SummarizerTrainer(
        _cfg(tmp_path / "w0", data_dir, tiny_policy_dir, tiny_ranker_dir, warmup_steps=0)
    )
    assert none.opt.param_groups[0]["lr"] == pytest.approx(1e-3)  # no warmup: the full lr at once


# ===================================================================== gradient clipping
# target: tests/test_summarizer_trainer.py
# kills: t04 (max_grad_norm ignored: Adam's first step hides the scale from the weights)
def test_the_optimizer_sees_gradients_clipped_to_max_grad_norm(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir
):
    t = SummarizerTrainer(
        _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, max_grad_norm=1e-4, eval_products=0)
    )
    grads = _record_grads(t)
    row = t.train_step()
    seen = float(torch.linalg.vector_norm(torch.stack([g.double().norm() for g in grads.values()])))
    assert row["grad_norm"] > 1e-3  # the logged norm is the one before clipping
    assert seen == pytest.approx(1e-4, rel=1e-3)


# ===================================================================== the GRPO loss
# target: tests/test_summarizer_trainer.py
# kills: g03 (the loss uses the configured beta, not the adapted self.beta), g04 (entropy_coef
#        dropped), g05 (dapo divides by every token slot, masked ones too), g08 (metrics of
#        micro-batches averaged, not weighted by their tokens)
def test_grpo_loss_is_the_token_mean_over_unmasked_tokens_with_the_current_beta(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir
):
    kw = dict(temperature=1.5, entropy_coef=0.3, eval_products=0, advantage="total")
    t = SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, **kw))
    t.train_step()  # the policy leaves the reference: the KL term has a value and a gradient
    r = _ragged(_group_rollouts(t, list(range(40, 46))), [2, 6, 1, 6, 3, 4])
    rewards = _rewards([1.0, 0.0, -1.0, 0.5, 0.2, -0.4])

    def update(trainer):
        trainer.opt.zero_grad(set_to_none=True)
        return trainer._grpo_update(r, rewards)

    t.beta = 0.7  # what an adapted (kl_target) weight would be by now
    m = update(t)
    with torch.no_grad():
        logp, ent = t._policy_logprobs(r, with_entropy=True)
        ref = t._ref_logprobs(r)
    adv = torch.tensor(t._advantages(rewards), dtype=torch.float32)
    want, _ = grpo_loss(
        logp,
        None,
        adv,
        r.completion_mask,
        ref_logp=ref,
        beta=0.7,
        entropy=ent,
        entropy_coef=0.3,
        loss_type="dapo",
    )
    assert m["kl"] > 0 and m["loss"] == pytest.approx(float(want), rel=1e-5)
    # grad_accum splits the batch, not the means: token-weighted metrics equal the one-batch ones
    t.cfg.grad_accum = 2
    m2 = update(t)
    for key in ("loss", "kl", "entropy", "clip_fraction"):
        assert m2[key] == pytest.approx(m[key], rel=1e-5, abs=1e-7), key


# ===================================================================== DPO pairs
# target: tests/test_summarizer_trainer.py (next to test_dpo_pairs_best_and_worst_of_each_group)
# kills: d01 (a tied group gives a pair), d02 (chosen and rejected swapped), d03 (the pair's rows
#        taken from the first group whatever group they belong to)
def test_dpo_pairs_each_groups_own_best_and_worst_rows_and_ties_give_none(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, monkeypatch
):
    t = SummarizerTrainer(
        _cfg(
            tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, algo="dpo", temperature=1.5, eval_products=0
        )
    )
    r = _group_rollouts(t, list(range(20, 26)))
    rows, real = [], summarizer_mod._rollout_rows
    monkeypatch.setattr(
        summarizer_mod, "_rollout_rows", lambda ro, which: rows.append(which.tolist()) or real(ro, which)
    )
    m = t._dpo_update(r, _rewards([0.5, 0.5, 0.5, 0.2, 0.9, -0.3]))  # group 0 tied: nothing to prefer
    assert m["pairs"] == 1 and rows == [[4, 5]]  # group 1's rows: chosen 3 + 1, rejected 3 + 2
    # every group tied: no pair, no gradient, no loss
    t.opt.zero_grad(set_to_none=True)
    rows.clear()
    assert t._dpo_update(r, _rewards([0.1] * 6)) == {"pairs": 0.0}
    assert rows == [] and all(p.grad is None for p in t.policy.parameters())


# kills: d04 (dpo_beta not used), d05 (each micro-batch's mean added up, not the step's mean),
#        d06 (metrics of micro-batches added, not weighted by their pairs)
def test_dpo_gradient_scales_with_dpo_beta_and_grad_accum_matches_one_batch(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir
):
    def run(name, **kw):
        t = SummarizerTrainer(
            _cfg(
                tmp_path / name,
                data_dir,
                tiny_policy_dir,
                tiny_ranker_dir,
                algo="dpo",
                temperature=1.5,
                eval_products=0,
                **kw,
            )
        )
        r = _group_rollouts(t, list(range(20, 26)))
        m = t._dpo_update(r, _rewards([0.3, 0.1, 0.8, 0.2, 0.9, -0.3]))
        return m, {n: p.grad.clone() for n, p in t.policy.named_parameters() if p.grad is not None}

    m1, g1 = run("one", dpo_beta=0.1)
    m5, g5 = run("five", dpo_beta=0.5)
    ma, ga = run("accum", dpo_beta=0.1, grad_accum=2)
    assert m1["pairs"] == 2 and g1
    # policy = reference: d loss / d margin = -beta / 2, so the gradient is proportional to beta
    for n, g in g1.items():
        assert rel_err(g5[n], 5 * g) < 1e-4, n
        assert rel_err(ga[n], g) < 1e-4, n
    for key in ("loss", "reward_accuracy", "reward_margin", "pairs"):
        assert ma[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key


# ===================================================================== the frozen reference
# target: tests/test_summarizer_trainer.py
# kills: m03 (reference left trainable), r13 (a resumed run's reference is the checkpoint, not the
#        initial policy)
def test_reference_stays_the_initial_policy_frozen_also_after_a_resume(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir
):
    from relsum_core.policy import load_policy

    base = dict(load_policy(str(tiny_policy_dir), device="cpu")[0].named_parameters())
    t = SummarizerTrainer(
        _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1, eval_products=0)
    )
    t.train()
    resumed = SummarizerTrainer(
        _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=2, eval_products=0)
    )
    assert resumed.step == 1
    for trainer in (t, resumed):
        assert all(not p.requires_grad for p in trainer.ref.parameters())
        for n, p in trainer.ref.named_parameters():
            assert torch.equal(p, base[n]), n
    assert any(not torch.equal(p, base[n]) for n, p in resumed.policy.named_parameters())


# ===================================================================== resume
# target: tests/test_summarizer_trainer.py (next to test_resume_gives_the_same_next_step)
# kills: r10 (the scheduler's state not restored: a resume inside the warmup restarts it after one step),
#        r11 (AdamW's state not restored)
def test_resume_inside_the_warmup_continues_the_schedule(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir
):
    kw = dict(warmup_steps=4, eval_products=0)
    SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=2, **kw)).train()
    resumed = SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=4, **kw))
    assert resumed.step == 2 and resumed.opt.state  # AdamW's moments came back too
    used, step = [], resumed.opt.step

    def recording_step(*a, **k):
        used.append(resumed.opt.param_groups[0]["lr"])
        return step(*a, **k)

    resumed.opt.step = recording_step
    resumed.train()
    # steps 3 and 4 of a 4-step warmup, as the uninterrupted run: the optimizer's state alone
    # would give step 3 right and restart the schedule after it
    assert used == pytest.approx([1e-3 * 3 / 4, 1e-3])


# ===================================================================== checkpoints and the log
# target: tests/test_summarizer_trainer.py
# kills: v01 (checkpoint written in place), v02 (old checkpoint removed, then written)
def test_a_save_that_fails_leaves_the_previous_checkpoint_whole(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, monkeypatch
):
    from safetensors.torch import load_file

    t = SummarizerTrainer(
        _cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1, eval_products=0)
    )
    t.train()
    ckpt = tmp_path / "run" / "checkpoint"
    saved = {n: w.clone() for n, w in load_file(ckpt / "model.safetensors").items()}
    t.train_step()  # step 2, the weights move

    def crash(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(t.tok, "save_pretrained", crash)  # after the weights are written, before trainer.pt
    with pytest.raises(RuntimeError, match="disk full"):
        t.save()
    assert torch.load(ckpt / "trainer.pt", weights_only=False)["step"] == 1
    now = load_file(ckpt / "model.safetensors")
    assert now.keys() == saved.keys() and all(torch.equal(now[n], saved[n]) for n in saved)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint", "metrics.jsonl"]


# kills: l02 (a fresh run appends to a crashed run's log), l03 (a resumed run logs its config again),
#        l06 (no eval at the last step), l09 (evaluations follow save_every), l11 (a resumed
#        run's progress bar starts at 0), l12 (progress=False still shows the bar)
def test_log_rows_of_a_rerun_and_a_resume_and_the_progress_bar(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, capsys
):
    run = tmp_path / "run"
    kw = dict(eval_products=1, eval_every=5, save_every=1)
    train_summarizer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1, **kw))
    assert "grpo (float32)" not in capsys.readouterr().err  # --no-progress: no bar
    import shutil

    shutil.rmtree(run / "checkpoint")  # a crash before the first checkpoint: the same command again
    train_summarizer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=1, **kw))
    assert [(r["event"], r.get("step")) for r in _rows(run / "metrics.jsonl")] == [
        ("config", None),
        ("eval", 0),
        ("train", 1),
        ("eval", 1),
    ]  # a new log, the last step evaluated
    capsys.readouterr()
    train_summarizer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, steps=3, progress=True, **kw))
    # one config row; evaluations at the start and the last step only (eval_every 5), not per save
    assert [(r["event"], r.get("step")) for r in _rows(run / "metrics.jsonl")] == [
        ("config", None),
        ("eval", 0),
        ("train", 1),
        ("eval", 1),
        ("train", 2),
        ("train", 3),
        ("eval", 3),
    ]
    err = capsys.readouterr().err
    assert "grpo (float32)" in err and "3/3" in err and "1/3" in err and "0/3" not in err


# ===================================================================== evaluation
# target: tests/test_summarizer_trainer.py
# kills: e01 (evaluation samples at the training temperature instead of greedily)
def test_evaluation_scores_the_greedy_summaries(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir):
    t = SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir, temperature=1.5))
    greedy = sample(t.sampler, t.tok, t._prompts(t.eval_ids), max_new_tokens=6, temperature=0.0).texts
    for _ in range(3):
        assert [s["summary"] for s in t.evaluate()["samples"]] == greedy


# ================================================================ rerun after a crash before a checkpoint
# target: tests/test_summarizer_trainer.py
#         (next to test_resume_refuses_other_settings_and_a_fresh_run_another_runs_log)
# kills: r06 (the rerun's check ignores rewritten models), r07 (the rerun's check compares the
#        path strings even though the log recorded the models' content)
def test_rerun_before_a_checkpoint_follows_the_models_not_their_paths(
    tmp_path, data_dir, tiny_policy_dir, tiny_ranker_dir
):
    import shutil

    from safetensors.torch import load_file, save_file

    ranker = tmp_path / "ranker"
    shutil.copytree(tiny_ranker_dir, ranker)
    one = dict(steps=1, eval_products=0)
    SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, ranker, **one)).train()
    shutil.rmtree(tmp_path / "run" / "checkpoint")  # crashed before its first save
    (tmp_path / "link").symlink_to(ranker)
    SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, tmp_path / "link", **one))  # the same ranker
    w = next(ranker.glob("*.safetensors"))  # what train-ranker --overwrite does to the folder
    tensors = load_file(w)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, w, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"other settings or models \(the ranker's weights at .*ranker\)"):
        SummarizerTrainer(_cfg(tmp_path, data_dir, tiny_policy_dir, ranker, **one))
