"""Data parallelism (parallel.py) as a specification, on the CPU with gloo and 2 processes:
N processes of batch b take the steps one process of batch N*b takes, E4's normaliser exact
across processes; a 2-process run killed mid-way resumes bit-identical."""

import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import data
import parallel
import ptft
import schedule
import toyworld
import train
from common import IGNORE_INDEX
from conftest import ROOT, assert_clear_error
from model import PreTrainingModel, make_config
from options import PretrainOptions
from tokenizer import SPECIAL_TOKENS, Tokenizer

STEPS, PER_PROCESS = 3, 6


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_batches():
    """STEPS batches of 2 * PER_PROCESS sentence pairs with B1 masks, and a tiny model's config."""
    tokenizer = Tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(60)])
    rng = np.random.default_rng(0)
    documents = [[rng.integers(len(SPECIAL_TOKENS), len(tokenizer), int(n)) for n in rng.integers(3, 12, 4)] for _ in range(30)]
    batches = [data.pretraining_batch(documents, tokenizer, rng, 2 * PER_PROCESS, 24) for _ in range(STEPS)]
    config = make_config("tiny", vocab_size=len(tokenizer), max_positions=24, hidden_size=32, num_heads=2,
                         intermediate_size=64, dropout=0.0, attention_dropout=0.0)
    return batches, config


def train_steps(processes, rows):
    """STEPS optimizer steps of train.pretraining_step on this process's `rows` of each batch."""
    batches, config = step_batches()
    torch.manual_seed(0)
    model = PreTrainingModel(config)
    optimizer = schedule.make_optimizer(model, 1e-2)
    run = SimpleNamespace(options=PretrainOptions(), device=torch.device("cpu"), precision="fp32", processes=processes,
                          scaler=torch.amp.GradScaler("cpu", enabled=False))
    training_model = parallel.data_parallel(model, processes, run.device)
    counts = []
    for batch in batches:
        part = {key: value[rows] for key, value in batch.items()}
        counts.append(int((part["mlm_labels"] != IGNORE_INDEX).sum()))
        train.pretraining_step(run, training_model, [part])
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict(), counts


def two_process_worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    processes = parallel.processes_from_environment(torch.device("cpu"))
    state, counts = train_steps(processes, slice(rank * PER_PROCESS, (rank + 1) * PER_PROCESS))
    torch.save({"state": state, "counts": counts}, os.path.join(out, f"rank-{rank}.pt"))
    parallel.finish(processes)


def test_two_processes_of_batch_b_take_the_steps_of_one_process_of_batch_2b(tmp_path):
    mp.spawn(two_process_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    expected, _ = train_steps(parallel.Processes(), slice(0, 2 * PER_PROCESS))
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    assert any(a != b for a, b in zip(ranks[0]["counts"], ranks[1]["counts"]))  # unequal masked counts: E4's rule matters
    for name, value in expected.items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name  # every process took the same update
        assert torch.allclose(ranks[0]["state"][name], value, atol=1e-5), name  # summation order differs


def test_accumulating_micro_batches_takes_the_step_of_one_batch_as_large_as_all_of_them():
    # --accum k: the gradients and losses of k micro-batches are those of one batch of all their rows,
    # E4 normalised by the masked tokens of the whole step (the micro-batches' counts differ)
    batches, config = step_batches()
    for batch in batches:
        halves = [{key: value[rows] for key, value in batch.items()} for rows in (slice(0, PER_PROCESS), slice(PER_PROCESS, None))]
        counts = [int((half["mlm_labels"] != IGNORE_INDEX).sum()) for half in halves]
        assert counts[0] != counts[1]
        results = []
        for accumulation, micro_batches in ((1, [batch]), (2, halves)):
            torch.manual_seed(0)
            model = PreTrainingModel(config)
            run = SimpleNamespace(options=PretrainOptions(accumulation=accumulation), device=torch.device("cpu"), precision="fp32",
                                  processes=parallel.Processes(), scaler=torch.amp.GradScaler("cpu", enabled=False))
            losses = train.pretraining_step(run, model, micro_batches)
            results.append((losses, {name: p.grad for name, p in model.named_parameters()}))
        (one, one_grads), (two, two_grads) = results
        assert one[2] == two[2] and one[0] == pytest.approx(two[0], abs=1e-6) and one[1] == pytest.approx(two[1], abs=1e-6)
        for name, grad in one_grads.items():
            assert torch.allclose(two_grads[name], grad, atol=1e-6), name


def torchrun(*args, output=True, shell=None):
    """`torchrun --nproc_per_node 2 ptft.py ARGS` as a process group of its own (for SIGKILL);
    with output, its stderr is kept (read it with finished()). shell: instead of ptft.py, each
    process runs `sh -c SHELL`, which may read $LOCAL_RANK (processes given different flags)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
               *(["--no-python", "sh", "-c", shell] if shell else [os.path.join(ROOT, "ptft.py"), *map(str, args)])]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if output else subprocess.DEVNULL,
                            text=True, start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def finished(launched, timeout=300):
    """(exit status, stderr) once it ends; the pipe is drained as it goes, so a chatty run never blocks."""
    _, err = launched.communicate(timeout=timeout)
    return launched.returncode, err


@pytest.mark.skipif(sys.platform == "win32", reason="process groups")
def test_a_two_process_run_killed_mid_way_resumes_bit_identical(tmp_path, cli):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), toyworld.toy_world(seed=2, num_documents=100)["unlabeled"])
    common = ["pretrain", "--corpus", corpus, "--steps", 30, "--batch-size", 4, "--max-length", 32, "--vocab-size", 300,
              "--save-every", 2, "--eval-every", 1000, "--device", "cpu", "--precision", "fp32", "--seed", 1]
    code, err = finished(torchrun(*common, "--out", tmp_path / "reference"))
    assert code == 0, err
    run = tmp_path / "killed"
    victim = torchrun(*common, "--out", run, output=False)
    deadline = time.time() + 300
    while victim.poll() is None and time.time() < deadline:
        path = run / "checkpoint.pt"
        if path.exists() and torch.load(path, weights_only=True)["step"] >= 4:  # early: a busy machine polls slowly
            os.killpg(victim.pid, signal.SIGKILL)  # the launcher and both workers, no chance to clean up
            break
    victim.wait()
    assert victim.returncode == -9, "the run finished before it could be killed"
    code, err = finished(torchrun(*common, "--out", run, "--resume"))
    assert code == 0, err
    expected = torch.load(tmp_path / "reference" / "checkpoint.pt", weights_only=True)
    found = torch.load(run / "checkpoint.pt", weights_only=True)
    assert found["step"] == expected["step"] == 30 and len(found["rng_by_rank"]) == 2
    assert found["run"]["world_size"] == 2
    for name, value in expected["model"].items():
        assert torch.equal(found["model"][name], value), name
    # its data streams are those of 2 processes: one process may not continue it
    assert_clear_error(cli(*common, "--out", run, "--resume", "--steps", 40), "world_size: checkpoint 2 vs now 1")


def test_commands_other_than_pretrain_and_finetune_refuse_to_run_under_torchrun(cli, monkeypatch, small_world, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_clear_error(cli("quantize", "--init", small_world["pre"], "--out", tmp_path / "x"), "quantize under torchrun")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("freeze, frozen", [("head", ("encoder.embeddings.", "encoder.layers.")),
                                            ("top-1", ("encoder.embeddings.", "encoder.layers.0."))])
def test_finetune_with_frozen_layers_under_two_processes_matches_one_process(small_world, tmp_path, cli, freeze, frozen):
    pre = tmp_path / "pre"  # no dropout: the two runs then differ only in how the batch is split
    assert cli("pretrain", "--corpus", small_world["corpus"], "--out", pre, "--steps", 5, "--batch-size", 8,
               "--max-length", 32, "--vocab-size", 300, "--dropout", 0, "--device", "cpu", "--precision", "fp32")[0] == 0
    common = ["finetune", "--init", pre, "--train", small_world["train"], "--valid", small_world["valid"],
              "--freeze", freeze, "--epochs", 3, "--lr", "1e-2", "--device", "cpu"]
    assert cli(*common, "--out", tmp_path / "one")[0] == 0
    code, err = finished(torchrun(*common, "--out", tmp_path / "two"))
    assert code == 0, err
    one, two = (torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"] for name in ("one", "two"))
    pretrained = torch.load(pre / "checkpoint.pt", weights_only=True)["model"]
    for name, value in one.items():
        if name.startswith(frozen):  # frozen: bit-identical in both
            assert torch.equal(value, pretrained[name]) and torch.equal(two[name], pretrained[name]), name
        else:
            assert not torch.equal(value, pretrained.get(name, value + 1)), name  # it trained
            assert torch.allclose(two[name], value, atol=1e-5), name



def test_bad_input_under_torchrun_ends_every_process_with_the_same_line_not_a_hang(tmp_path):
    code, err = finished(torchrun("pretrain", "--out", tmp_path / "out", "--steps", -3), timeout=120)
    assert code != 0  # torchrun's own status (1) once its workers exit with 2
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    # every worker that gets that far says the same one line (torchrun stops the others at the first failure)
    assert 1 <= len(errors) <= 2 and set(errors) == {"error: --steps must be at least 1, got -3"}


def test_a_two_process_run_without_nsp_trains_the_mlm_alone(tmp_path):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), toyworld.toy_world(seed=2, num_documents=60)["unlabeled"])
    # the pooler and the NSP head take no part in the loss: every process must still agree on the step
    code, err = finished(torchrun("pretrain", "--corpus", corpus, "--out", tmp_path / "run", "--steps", 3, "--no-nsp",
                                  "--batch-size", 4, "--max-length", 32, "--vocab-size", 300, "--device", "cpu",
                                  "--precision", "fp32", "--eval-every", 3), timeout=120)
    assert code == 0, err[-2000:]
    found = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert found["step"] == 3 and found["run"]["world_size"] == 2


def test_a_diverging_two_process_run_stops_both_processes_with_the_same_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    data.write_corpus(str(corpus), toyworld.toy_world(seed=2, num_documents=60)["unlabeled"])
    # an absurd rate: the first update ruins the (shared) weights, so every process sees a NaN at step 2
    code, err = finished(torchrun("pretrain", "--corpus", corpus, "--out", tmp_path / "run", "--steps", 10, "--lr", "1e30",
                                  "--batch-size", 4, "--max-length", 32, "--vocab-size", 300, "--device", "cpu",
                                  "--precision", "fp32"), timeout=120)
    assert code != 0
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1 and "training diverged at step" in errors[0], err[-2000:]


def test_processes_given_different_data_or_settings_all_refuse_with_one_line(small_world, tmp_path, cli):
    # each process builds its own command from $LOCAL_RANK: another corpus for pretrain, another
    # --epochs for finetune -- a run on mismatched processes would train to a silent mess
    ptft = f"{sys.executable} {os.path.join(ROOT, 'ptft.py')}"
    for rank in (0, 1):
        (tmp_path / f"corpus{rank}.txt").write_text(open(small_world["corpus"]).read()[rank * 500:])
    code, err = finished(torchrun(shell=f"exec {ptft} pretrain --corpus {tmp_path}/corpus$LOCAL_RANK.txt --out "
                                        f"{tmp_path}/pre --steps 3 --batch-size 4 --max-length 32 --vocab-size 300 "
                                        "--device cpu"))
    errors = {line for line in err.splitlines() if line.startswith("error: ")}
    assert code != 0 and len(errors) == 1 and "differs" in errors.pop(), err[-2000:]
    code, err = finished(torchrun(shell=f"exec {ptft} finetune --init {small_world['pre']} --train "
                                        f"{small_world['train']} --out {tmp_path}/ft --epochs $((1 + LOCAL_RANK)) "
                                        "--device cpu"))
    errors = {line for line in err.splitlines() if line.startswith("error: ")}
    assert code != 0 and errors == {"error: under torchrun every process must run the same settings on the same "
                                    "data, but epochs differs: rank 0 has 1, rank 1 2"}, err[-2000:]


def test_the_collective_timeout_flag_reaches_the_process_group(monkeypatch):
    # --collective-timeout S: a process waits S seconds for the others, then every process stops with
    # one line (parallel.lost_processes_said_in_one_line), not torch's 30 minutes
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(parallel.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(parallel.dist, "init_process_group", lambda backend, timeout: seen.update(timeout=timeout))
    monkeypatch.setattr(parallel.dist, "get_rank", lambda: 0)
    monkeypatch.setattr(parallel.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(parallel, "CHOSEN_TIMEOUT", {})
    parallel.processes_from_environment(torch.device("cpu"), 42)
    assert seen["timeout"].total_seconds() == 42 and parallel.collective_timeout().total_seconds() == 42
    assert ptft.build_parser().parse_args(["pretrain", "--out", "x", "--collective-timeout", "7"]).collective_timeout == 7
    assert ptft.build_parser().parse_args(["finetune", "--init", "scratch", "--train", "t", "--out", "x"]
                                          ).collective_timeout == 300

    def never_arrives(backend, timeout):
        raise RuntimeError("Timed out after 42 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(parallel.dist, "init_process_group", never_arrives)
    with pytest.raises(parallel.ProcessesLost, match="another process stopped or failed .collective timeout 42 s"):
        parallel.processes_from_environment(torch.device("cpu"), 42)
