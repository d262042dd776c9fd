"""Data parallelism: one process per GPU (or per CPU process), started by torchrun.

    torchrun --nproc_per_node 2 ptft.py pretrain --out runs/pre ...        (one machine)
    torchrun --nnodes 2 --node_rank R --nproc_per_node 8 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29500 ptft.py pretrain ...   (two machines)

torchrun starts N copies of the program and tells each its RANK (0 .. N-1), the WORLD_SIZE N and
its LOCAL_RANK on its machine. Every process holds the whole model, trains on its own part of
each step's batch, and after the backward pass the gradients are summed across processes
(PyTorch's DistributedDataParallel: NCCL between GPUs, gloo between CPU processes), so every
process takes the same update. Plain `python ptft.py pretrain` is one process and none of this runs.

The one rule that needs care is E4's normaliser: the MLM loss is a sum over the masked tokens
of the WHOLE step divided by their number. Each process divides its own sum by the total count
(summed across processes first), and the gradients are SUMMED, not averaged (sum_gradients) --
the same rule as gradient accumulation across micro-batches (train.pretraining_step).

Run `python parallel.py` to see what this process would be.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import InputError


@dataclass
class Processes:
    """Who this process is among the N training together (N = 1: a plain run)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self):
        """Rank 0 alone writes checkpoints, metrics and the progress bar."""
        return self.rank == 0

    def device(self, device):
        """This process's device: under torchrun on GPUs, GPU LOCAL_RANK."""
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device

    def log(self, log):
        """`log` on rank 0; silence on the others (one process speaks for all)."""
        return log if self.main else (lambda *args: None)


# How long a process waits for the others at a collective (a gradient sum, a gather) before it
# gives up: one stopped or lost process then ends them all, with one line, in minutes rather than
# torch's default 30. --collective-timeout (pretrain, finetune) or PTFT_COLLECTIVE_TIMEOUT
# (seconds, for every command) changes it.
COLLECTIVE_TIMEOUT_SECONDS = 300
CHOSEN_TIMEOUT = {}  # "seconds": the --collective-timeout processes_from_environment was given


def collective_timeout():
    if CHOSEN_TIMEOUT.get("seconds"):
        return datetime.timedelta(seconds=CHOSEN_TIMEOUT["seconds"])
    value = os.environ.get("PTFT_COLLECTIVE_TIMEOUT", str(COLLECTIVE_TIMEOUT_SECONDS))
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1
    if not 0 < seconds < 10 ** 7:
        raise InputError(f"PTFT_COLLECTIVE_TIMEOUT={value}: expected a positive number of seconds")
    return datetime.timedelta(seconds=seconds)


class ProcessesLost(InputError):
    """A collective did not complete: another process stopped, died or timed out."""


@contextlib.contextmanager
def lost_processes_said_in_one_line():
    """A collective that fails (a process died, or stopped past collective_timeout) ends this
    process with one line (ProcessesLost, exit status 2) instead of torch's traceback."""
    try:
        yield
    except RuntimeError as error:  # torch.distributed.DistBackendError and its kin
        reason = (str(error).strip().splitlines()[0][:160] if str(error).strip()
                  else type(error).__name__)
        raise ProcessesLost(f"another process stopped or failed "
                            f"(collective timeout {collective_timeout().total_seconds():g} s): "
                            f"{reason}") from None


def processes_from_environment(device, timeout_seconds=None):
    """torchrun's environment -> Processes; with WORLD_SIZE > 1 the process group is started
    (NCCL on GPUs, gloo on CPUs; collective_timeout, or timeout_seconds where given) and, on
    GPUs, this process is given GPU LOCAL_RANK."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    if timeout_seconds:
        CHOSEN_TIMEOUT["seconds"] = timeout_seconds
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        with lost_processes_said_in_one_line():  # a process that never arrives: one line too
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    timeout=collective_timeout())
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank)


def sum_over_processes(values, processes, device):
    """A list of numbers summed across processes (itself when there is one)."""
    if processes.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    with lost_processes_said_in_one_line():
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_from_processes(value, processes):
    """Every process's `value` (any picklable object), as a list indexed by rank."""
    if processes.world_size == 1:
        return [value]
    gathered = [None] * processes.world_size
    with lost_processes_said_in_one_line():
        dist.all_gather_object(gathered, value)
    return gathered


def same_on_every_process(value, processes):
    """Rank 0's value, on every process (e.g. a decision only rank 0 can make)."""
    if processes.world_size == 1:
        return value
    holder = [value]
    with lost_processes_said_in_one_line():
        dist.broadcast_object_list(holder, src=0)
    return holder[0]


def refuse_differences(value, processes):
    """Every process's `value` (a dict) compared with rank 0's: all refuse, with the same line
    naming the first difference, if any process differs (e.g. another --steps, another corpus)."""
    if processes.world_size == 1:
        return
    gathered = gather_from_processes(value, processes)
    for rank, other in enumerate(gathered[1:], start=1):
        differing = [key for key in gathered[0] if other.get(key) != gathered[0].get(key)]
        if differing:
            key = differing[0]
            raise InputError(f"under torchrun every process must run the same settings on the "
                             f"same data, but {key} differs: rank 0 has {gathered[0].get(key)!r}, "
                             f"rank {rank} {other.get(key)!r}")


def on_rank_0(processes, action):
    """action() on rank 0 alone (preparing the run folder); an InputError there is raised on
    every process, so that all of them stop with the same one line instead of waiting forever."""
    refused = None
    if processes.main:
        try:
            action()
        except InputError as error:
            refused = str(error)
    refused = same_on_every_process(refused, processes)
    if refused:
        raise InputError(refused)


def sum_gradients(process_group, bucket):
    """A DistributedDataParallel communication hook: SUM each bucket of gradients across
    processes (the default hook averages them). See the module's docstring for why."""
    summing = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return summing.get_future().then(lambda f: f.value()[0])


def rows_of_this_process(index, processes):
    """Fine-tuning under torchrun: this process's rows of a batch (`index`), every N-th one, and
    its weight 1 -- or, for a process left without a row, one row with weight 0 (every process
    takes part in summing the gradients). One process: all of them."""
    rows = index[processes.rank::processes.world_size]
    return (rows, 1.0) if len(rows) else (index[:1], 0.0)


def share_of_batch_mean(loss, rows, weight, batch_size, processes):
    """A loss averaged over this process's `rows` -> its share of the mean over the whole batch:
    mean * weight * len(rows) / batch_size, so that the processes' summed gradients (sum_gradients)
    are the gradient of the batch's mean. One process: the loss itself."""
    if processes.world_size == 1:
        return loss
    return loss * (weight * len(rows) / batch_size)


def data_parallel(model, processes, device, unused_weights=False):
    """model wrapped for data-parallel training (gradients summed across processes), or model
    itself.
    unused_weights: some trainable weights take no part in the loss (the pooler and the NSP head
    when NSP is off); DistributedDataParallel must then look for them every step, or it waits for
    their gradients and fails at the next step."""
    if processes.world_size == 1:
        return model
    device_ids = [processes.local_rank] if device.type == "cuda" else None
    wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids,
                                                        find_unused_parameters=unused_weights)
    wrapped.register_comm_hook(None, sum_gradients)
    return wrapped


def finish(processes):
    if processes.world_size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    print(f"WORLD_SIZE {os.environ.get('WORLD_SIZE', '1')}, RANK {os.environ.get('RANK', '0')}: "
          f"{Processes() if 'WORLD_SIZE' not in os.environ else 'started by torchrun'}")
