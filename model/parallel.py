"""Scale-out on PyTorch's own distributed engine: DeviceMesh, expert parallelism, FSDP2/HSDP.

Layout (as in torchtitan): the data-parallel ranks form a ``(dp_replicate, dp_shard)`` mesh
for the dense parameters (attention, dense and shared MLPs, embeddings); the routed experts
live on an expert mesh ``(dp_replicate, dp_shard // ep, ep)``: each EP rank holds
``n_experts // ep`` experts, and the remaining data-parallel dimension FSDP-shards them.
EP ranks are the fastest-varying dimension, so an EP group stays inside a node when the
world spans nodes (ranks are numbered node by node) and the all-to-all rides NVLink.

Expert-parallel dispatch: every rank groups its (token, expert) assignments by expert,
exchanges per-expert counts with ``all_to_all_single``, sends the token rows to the ranks
owning their experts (uneven splits), runs the local experts through the same ``kernels``
ops, and sends the outputs back with the inverse all-to-all; the weighted sum over k
happens where the tokens live. Both all-to-alls are differentiable
(``torch.distributed.nn.functional.all_to_all_single``).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

import kernels

# torch 2.10+ calls the autograd-aware all_to_all_single deprecated in favour of a private module
warnings.filterwarnings("ignore", message=".*distributed.nn.functional.all_to_all_single is deprecated.*")


def ep_moe_experts(
    x_TD: torch.Tensor,
    weights_TK: torch.Tensor,
    experts_TK: torch.Tensor,
    w_gate_local: torch.Tensor,
    w_up_local: torch.Tensor,
    w_down_local: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    autograd: bool = True,
) -> torch.Tensor:
    """``kernels.moe_experts`` with the experts spread over the ranks of ``group``.

    ``experts_TK`` holds global expert ids; rank r of the group owns experts
    ``[r * E_local, (r + 1) * E_local)``. Returns this rank's ``y_TD``. ``autograd=False``
    (inference) uses the plain collectives.
    """
    a2a = dist_fn.all_to_all_single if autograd else _all_to_all
    W = dist.get_world_size(group)
    E_local = w_gate_local.shape[0]
    E = E_local * W
    T, D = x_TD.shape
    x_perm, counts_E, _, row_index = kernels.permute(x_TD, experts_TK, E)

    # 1. how many rows each rank sends to each of my local experts
    counts_recv = torch.empty_like(counts_E)
    dist.all_to_all_single(counts_recv, counts_E, group=group)
    counts_send_WE = counts_E.view(W, E_local)
    counts_recv_WE = counts_recv.view(W, E_local)
    send_splits = counts_send_WE.sum(1).tolist()
    recv_splits = counts_recv_WE.sum(1).tolist()

    # 2. the token rows themselves (uneven splits), differentiable
    x_recv = a2a(
        x_perm.new_empty((sum(recv_splits), D)), x_perm, recv_splits, send_splits, group=group
    )
    # rows arrive ordered by (source rank, local expert): tag each with its local expert
    local_ids = torch.repeat_interleave(
        torch.arange(E_local, device=x_TD.device).repeat(W), counts_recv_WE.reshape(-1)
    )
    ones = torch.ones((x_recv.shape[0], 1), dtype=torch.float32, device=x_TD.device)
    if x_recv.shape[0] == 0:
        # nothing for my experts: the kernels return a tensor cut off from the graph here, but
        # every rank must run the same backward collectives (the inverse all-to-all, FSDP's
        # reduce-scatter of expert grads), so keep x_recv and the weights in the graph (zeros)
        zero = (w_gate_local.sum() + w_up_local.sum() + w_down_local.sum()) * 0
        y_recv = x_recv * 0 + zero.to(x_recv.dtype)
    else:
        y_recv = kernels.moe_experts(x_recv, ones, local_ids[:, None], w_gate_local, w_up_local, w_down_local)

    # 3. back to the ranks the tokens came from, then the weighted sum over k
    y_perm = a2a(
        y_recv.new_empty((x_perm.shape[0], y_recv.shape[1])), y_recv, send_splits, recv_splits, group=group
    )
    return kernels.unpermute(y_perm, weights_TK, row_index, T)


def _all_to_all(out, inp, out_splits, in_splits, group=None):
    dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)
    return out


# ---------------------------------------------------------------------- expert parallelism at inference
# Every rank runs the same batch (rank 0 broadcasts each step's plan; model/batching.py):
# attention, embeddings, dense and shared MLPs are replicated, each rank holds 1/N of every
# MoE layer's routed experts. Large steps (prefill) split the tokens over the ranks and
# dispatch them with the all-to-all of training (count exchange, uneven splits), then
# all-gather the outputs; small steps (decode: T = batch rows) skip the all-to-alls: each
# rank runs its own experts on the tokens routed to them and one all-reduce sums the parts.
EP_SMALL_T = 64  # steps of at most this many tokens take the all-reduce road


def ep_infer_experts(x_TD, weights_TK, experts_TK, w_gate, w_up, w_down, *, group=None,
                     small_t: int = EP_SMALL_T) -> torch.Tensor:
    """``GroupedExperts.experts_fn`` for inference with the experts sharded over ``group``."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    T, D = x_TD.shape
    E_local = w_gate.shape[0]
    if T <= small_t:
        t_idx, k_idx = (experts_TK // E_local == r).nonzero(as_tuple=True)
        y = x_TD.new_zeros((T, D))
        if t_idx.numel():
            local = (experts_TK[t_idx, k_idx] - r * E_local)[:, None]
            y_sel = kernels.moe_experts(x_TD[t_idx], weights_TK[t_idx, k_idx][:, None], local, w_gate, w_up, w_down)
            y.index_add_(0, t_idx, y_sel.to(y.dtype))
        dist.all_reduce(y, group=group)
        return y
    chunk = -(-T // W)  # this rank's tokens: rows [r*chunk, (r+1)*chunk), maybe none
    a, b = min(T, r * chunk), min(T, (r + 1) * chunk)
    y_mine = ep_moe_experts(x_TD[a:b], weights_TK[a:b], experts_TK[a:b], w_gate, w_up, w_down, group, autograd=False)
    buf = x_TD.new_zeros((chunk, D))
    buf[:b - a] = y_mine.to(buf.dtype)
    out = x_TD.new_empty((W * chunk, D))
    dist.all_gather_into_tensor(out, buf, group=group)
    return out[:T]


def shard_experts_for_inference(model: torch.nn.Module, group=None, small_t: int = EP_SMALL_T) -> int:
    """Keep only this rank's 1/N of every MoE layer's routed experts (plain tensors) and route
    their tokens through :func:`ep_infer_experts`. Returns the experts kept per layer."""
    W, r = dist.get_world_size(group), dist.get_rank(group)
    kept = 0
    for moe in model.moe_layers():
        ex = moe.experts
        E = ex.w_gate.shape[0]
        if E % W:
            raise ValueError(f"n_experts {E} is not divisible by --ep {W}")
        n = E // W
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(ex, name)
            setattr(ex, name, torch.nn.Parameter(full.detach()[r * n:(r + 1) * n].clone(), requires_grad=False))
        ex.experts_fn = functools.partial(ep_infer_experts, group=group, small_t=small_t)
        kept = n
    return kept


@dataclass
class ServeDist:
    """The process layout of ``moecoder serve`` (one process: rank 0 of 1, nothing initialised)."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    plan_group: object | None = None  # gloo group for the plan broadcast (CPU objects)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_serve(ep: int, device: str = "cpu", timeout_s: float = 60.0) -> ServeDist:
    """Initialise expert parallelism for serving from torchrun's environment.

    The world is the EP group (``--ep`` must equal the number of processes). Collectives
    time out after ``timeout_s``: a rank that dies or hangs ends every other rank with an
    error instead of a hang. On CUDA rank r uses ``cuda:LOCAL_RANK`` and NCCL for the
    expert exchange; the plan broadcast always rides a gloo group.
    """
    from datetime import timedelta

    rank, world, local = env_rank()
    if ep < 1:
        raise ValueError("--ep must be at least 1")
    if world == 1:
        if ep > 1:
            raise ValueError(f"--ep {ep} needs {ep} processes: launch with torchrun --nproc-per-node {ep}")
        return ServeDist(device=device)
    if ep != world:
        raise ValueError(f"--ep {ep} must equal the number of processes ({world})")
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=timeout_s)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=rank, world_size=world,
                                timeout=timeout)
    plan_group = dist.new_group(backend="gloo", timeout=timeout) if cuda else None
    return ServeDist(rank, world, device, plan_group)


def plan_channel(sd: ServeDist):
    """(send, receive) of step plans from rank 0 to the others (pickled objects)."""

    def send(obj) -> None:
        dist.broadcast_object_list([obj], src=0, group=sd.plan_group)

    def receive():
        box = [None]
        dist.broadcast_object_list(box, src=0, group=sd.plan_group)
        return box[0]

    return send, receive


@dataclass
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = -1  # -1: whatever the world size leaves
    ep: int = 1

    def resolve(self, world_size: int) -> ParallelDims:
        shard = self.dp_shard if self.dp_shard > 0 else world_size // max(self.dp_replicate, 1)
        dims = ParallelDims(self.dp_replicate, shard, self.ep)
        if dims.dp_replicate * dims.dp_shard != world_size:
            raise ValueError(
                f"--dp-replicate {dims.dp_replicate} x --dp-shard {dims.dp_shard} != world size {world_size}"
            )
        if dims.ep < 1 or dims.dp_shard % dims.ep != 0:
            raise ValueError(f"--ep {dims.ep} must divide --dp-shard {dims.dp_shard}")
        return dims


def _ep_experts_fn(x_TD, weights_TK, experts_TK, w_gate, w_up, w_down, group=None):
    """``GroupedExperts.experts_fn`` under EP: the parameters are DTensors sharded on dim 0."""
    return ep_moe_experts(x_TD, weights_TK, experts_TK, w_gate.to_local(), w_up.to_local(), w_down.to_local(), group)


def shard_experts(experts: torch.nn.Module, ep_mesh) -> None:
    """Turn a ``GroupedExperts``' stacked weights into DTensors sharded over ``ep_mesh``
    (rank r holds experts ``[r*E/ep, (r+1)*E/ep)``) and route its tokens through EP.

    As DTensors the expert weights keep their global shape, so checkpoints save and load
    on any number of ranks (torch.distributed.checkpoint reshards them).
    """
    from torch.distributed.tensor import Shard, distribute_tensor

    E, ep = experts.w_gate.shape[0], ep_mesh.size()
    if E % ep:
        raise ValueError(f"n_experts {E} is not divisible by ep {ep}")
    for name in ("w_gate", "w_up", "w_down"):
        full = getattr(experts, name)
        dt = distribute_tensor(full.detach(), ep_mesh, [Shard(0)])
        setattr(experts, name, torch.nn.Parameter(dt, requires_grad=full.requires_grad))
    experts.experts_fn = functools.partial(_ep_experts_fn, group=ep_mesh.get_group())


@dataclass
class Parallel:
    """What a training loop needs to know about the layout it runs in."""

    dims: ParallelDims
    rank: int
    world_size: int
    dense_mesh: object | None = None  # DeviceMesh ("dp_replicate", "dp_shard")
    expert_mesh: object | None = None  # DeviceMesh ("dp_replicate", "dp_shard_mod_ep", "ep")

    @property
    def ep_rank(self) -> int:
        return self.rank % self.dims.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def build_meshes(dims: ParallelDims, device_type: str) -> tuple[object, object | None]:
    from torch.distributed.device_mesh import init_device_mesh

    dense = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard), mesh_dim_names=("dp_replicate", "dp_shard"))
    expert = None
    if dims.ep > 1:
        expert = init_device_mesh(
            device_type,
            (dims.dp_replicate, dims.dp_shard // dims.ep, dims.ep),
            mesh_dim_names=("dp_replicate", "dp_shard_mod_ep", "ep"),
        )
    return dense, expert


def parallelize(model: torch.nn.Module, dims: ParallelDims, device_type: str = "cpu",
                param_dtype: torch.dtype | None = None) -> Parallel:
    """Apply expert parallelism and FSDP2 (HSDP when ``dp_replicate > 1``) to a Transformer.

    Call after the process group is initialised and before building the optimizer. With
    ``param_dtype`` (e.g. bf16 on GPU) FSDP gathers parameters in that dtype and reduces
    gradients in float32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from model.moe import MoE

    world = dist.get_world_size()
    dims = dims.resolve(world)
    dense, expert = build_meshes(dims, device_type)
    par = Parallel(dims, dist.get_rank(), world, dense, expert)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    dense_mesh = dense if dims.dp_replicate > 1 else dense["dp_shard"]
    ignored: set[torch.nn.Parameter] = set()
    for block in model.layers:
        if expert is not None and isinstance(block.ffn, MoE):
            experts = block.ffn.experts
            shard_experts(experts, expert["ep"])
            # tokens of every data-parallel rank reach these experts through the all-to-all,
            # so their gradients arrive summed over the world: average them over it
            emesh = expert["dp_replicate", "dp_shard_mod_ep"] if dims.dp_replicate > 1 else expert["dp_shard_mod_ep"]
            if emesh.size() > 1:
                fully_shard(experts, mesh=emesh, mp_policy=mp)
                experts.set_gradient_divide_factor(float(world))
                if dist.get_backend() == "gloo":  # gloo has no PREMUL_SUM: sum, then divide
                    experts.set_force_sum_reduction_for_comms(True)
            else:
                # no data-parallel peer holds these experts: nothing to shard or reduce.
                # (FSDP2 divides twice by a custom factor on a 1-rank mesh, so scale by hand.)
                for p in experts.parameters():
                    p.register_hook(functools.partial(_divide_grad, factor=float(world)))
                    ignored.add(p)
        fully_shard(block, mesh=dense_mesh, mp_policy=mp, ignored_params=ignored or None)
    fully_shard(model, mesh=dense_mesh, mp_policy=mp, ignored_params=ignored or None)
    return par


def _divide_grad(grad: torch.Tensor, factor: float) -> torch.Tensor:
    return grad / factor  # before accumulation, so gradient accumulation stays right


def all_reduce_expert_counts(model: torch.nn.Module) -> None:
    """Sum every MoE layer's accumulated tokens-per-expert over all ranks (before update_bias)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for moe in model.moe_layers():
        dist.all_reduce(moe.counts_acc)


def env_rank() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (single process: 0, 1, 0)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


# ---------------------------------------------------------------------- the training command
# model/train.py is handed a Layout and calls its methods; on one process (no torchrun)
# every one of them is a no-op or the single-device code path, so a plain run behaves
# exactly as before. There is no module-global state: the Layout is passed explicitly.


@dataclass
class Layout:
    """The process layout of a training job: one process (``Layout()``: rank 0 of 1), or
    ranks of a torchrun job on the ``dims`` meshes (:func:`init_from_env`)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: how many times torchrun restarted the workers
    dims: ParallelDims | None = None
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def agree(self, *flags: bool) -> list[bool]:
        """Each flag true on any rank is true on all (one tiny all-reduce): every rank stops,
        checkpoints and exports at the same step even when time or a signal reached one first."""
        if not self.distributed:
            return [bool(f) for f in flags]
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def dp_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of a (loss) tensor over the data-parallel ranks; itself on one process."""
        if not self.distributed:
            return t
        t = t.detach().clone()
        dist.all_reduce(t)  # gloo has no AVG
        return t / self.world_size

    def local_rows(self, n_rows: int) -> slice:
        """This rank's slice of a micro-batch of ``n_rows`` global rows (rank r: the r-th block)."""
        per = n_rows // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def parallelize(self, model: torch.nn.Module, device_type: str, param_dtype=None) -> None:
        """Expert parallelism + FSDP2/HSDP on this layout's meshes (nothing on one process)."""
        if self.distributed:
            parallelize(model, self.dims, device_type, param_dtype=param_dtype)

    def full_model_copy(self, model: torch.nn.Module, model_cfg):
        """A plain (unsharded, CPU, float32) copy of a sharded Transformer on rank 0, None on
        the other ranks (a collective: every rank must call it); ``model`` on one process."""
        if not self.distributed:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from model.transformer import Transformer

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.is_main:
            return None
        plain = Transformer(model_cfg)
        missing, unexpected = plain.load_state_dict(full, strict=False)
        if unexpected or [k for k in missing if k in dict(plain.named_parameters())]:
            raise RuntimeError(f"gathered state dict does not fit the model: missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]}")
        return plain

    def shutdown(self, synchronise: bool = False) -> None:
        """Leave the process group. ``synchronise`` (every rank ended the run normally): first wait
        for all ranks, so that none tears its gloo/NCCL connections down while another still uses
        them (rank 1 used to leave while rank 0 was still exporting). Not after an error: a dead
        rank would hang it. The aborts at exit that remained are the interpreter's teardown, which
        ``model.train`` skips (see ``model.train._end_worker``)."""
        if self.distributed and dist.is_initialized():
            if synchronise:
                dist.barrier()
            dist.destroy_process_group()


def init_from_env(args) -> Layout:
    """The layout of this process from torchrun's environment; raises ValueError on a bad one.

    Under torchrun (WORLD_SIZE > 1) the process group is initialised (gloo on CPU, NCCL for
    CUDA tensors) on a store prefix of its own per restart attempt, so that a restarted
    attempt never reads keys the failed one left behind; on CUDA ``args.device`` becomes
    ``cuda:LOCAL_RANK``. One process: nothing is initialised and the flags must be 1.
    """
    from datetime import timedelta

    rank, world, local = env_rank()
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    dims = ParallelDims(args.dp_replicate, args.dp_shard, args.ep)
    if dims.dp_replicate < 1 or dims.dp_shard == 0 or dims.dp_shard < -1 or dims.ep < 1:
        raise ValueError("--dp-replicate, --dp-shard and --ep must be positive (--dp-shard -1: the rest)")
    if world == 1:
        if dims.dp_replicate > 1 or dims.dp_shard > 1 or dims.ep > 1:
            raise ValueError("--dp-replicate/--dp-shard/--ep need several processes: launch with torchrun --nproc-per-node N")
        return Layout(restart=restart, dims=ParallelDims(1, 1, 1))
    dims = dims.resolve(world)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if dims.ep > 1 and local_world % dims.ep and rank == 0:
        print(f"moecoder train: note: --ep {dims.ep} does not divide the {local_world} processes per node, "
              "so some EP groups span nodes (their all-to-all leaves NVLink)", file=sys.stderr)
    cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError("--device cuda but CUDA is not available")
        args.device = f"cuda:{local}"
        torch.cuda.set_device(local)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if not dist.is_initialized():
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # torchrun's agent hosts the store (TORCHELASTIC_USE_AGENT_STORE); else rank 0 does
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
        store = dist.TCPStore(host, port, world, is_master=rank == 0 and not agent, timeout=timedelta(minutes=10))
        store = dist.PrefixStore(f"attempt_{restart}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timedelta(minutes=30))
    return Layout(rank, world, local, restart, dims, backend)


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` that is right for sharded parameters on several meshes.

    Dense parameters are DTensors on the data-parallel mesh, routed experts on the expert
    mesh: the norm of each group is reduced over its own mesh, and the squares are summed.
    ``max_norm <= 0`` only measures. One process: torch's own function, unchanged.
    """
    from torch.distributed.tensor import DTensor

    params = [p for p in params if p.grad is not None]
    if not any(isinstance(p.grad, DTensor) for p in params):
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params])
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        g = p.grad
        key = (g.device_mesh, tuple(g.placements)) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    sq = None
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(n, DTensor):
            n = n.full_tensor()  # sums the shards' squares over the group's mesh
        sq = n ** 2 if sq is None else sq + n ** 2
    total = sq.sqrt()
    if max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        with torch.no_grad():
            for grads in groups.values():
                for g in grads:
                    (g.to_local() if isinstance(g, DTensor) else g).mul_(coef.to(g.dtype))
    return total


class NullLogger:
    """The logger of ranks > 0: rank 0 alone writes logs and metrics."""

    tty = False

    def line(self, msg: str) -> None:
        pass

    def record(self, rec: dict) -> None:
        pass

    def progress(self, msg: str) -> None:
        pass

    def step(self, msg: str, step: int, max_steps: int) -> None:
        pass

    def close(self) -> None:
        pass
