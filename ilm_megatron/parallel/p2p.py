"""Point-to-point transport of the pipeline ring (docs/pipeline.md, "Transport").

Every tick of the ring schedule each stage exchanges one message with each of its two neighbours
in each direction: forward (iterates, to stage ``s + 1``) and backward (gradients, to stage
``s - 1``), indices modulo ``P``. A tick is two paired, untagged ``batch_isend_irecv`` calls on
the pipeline group, in the pattern of Megatron-Core's ``p2p_communication``:

1. **Headers**: an int32 ``[kind, mb, step, flag, parts]`` per direction, always sent (20 bytes),
   so a receiver knows what follows.
2. **Payloads**: only the tensors the headers announce (``parts`` bits: the iterate or gradient,
   the injection ``u``, the accumulated injection gradient).

Because both ends of a link derive the payload operations from the same header, every send has its
receive, so the same code runs on NCCL (device buffers, no host staging) and gloo (CPU). The
operations of a call are posted in a canonical order (by link index ``e`` = the link from stage
``e`` to ``e + 1``, forward before backward), so with ``P = 2``, where both links join the same two
ranks, the untagged messages still pair in order.

Under tensor parallelism the iterate and its gradient are replicated over the TP group (without
sequence parallelism): each TP rank then sends only its ``1 / tp`` slice of the flattened tensor
and the receivers all-gather the slices inside their TP group, so a link carries the iterate once,
not ``tp`` times. Under sequence parallelism the iterate is already this rank's ``l / tp``
positions and goes as it is. ``wire_dtype`` (e.g. bf16) casts iterates and gradients for the wire;
the receiver casts back.

The transport counts what it sends, in bytes per kind (``sent``), and the blocking time
(``wait_s``).

A stage leaves the ring after global completion: stage 0, which sees every micro-batch end, sends
``K_STOP`` on both links; a stage that has received or sent a stop on a link drops that link and
sends stops on its live links; it leaves when no link is live. Both ends of a link know when it
dies, so no operation is left unpaired.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

# message kinds
K_NONE, K_SOLVE, K_PHANTOM, K_DONE, K_BWD, K_STOP = 0, 1, 2, 3, 4, 5
# payload parts (bits of the header's last field)
P_Z, P_U, P_GU = 1, 2, 4
HEADER = 5  # int32: kind, micro-batch, step, flag, parts


@dataclass
class Message:
    """What one stage sends on one link in one tick.

    Attributes:
        kind: ``K_SOLVE`` / ``K_PHANTOM`` (forward: a solver or phantom evaluation), ``K_DONE``
            (the last stage has the loss of ``mb``), ``K_BWD`` (backward of phantom step
            ``step``), ``K_STOP``, or ``K_NONE`` (nothing this tick).
        mb: micro-batch index (-1 for none).
        step: solver evaluation or phantom step of ``mb``.
        flag: ``K_SOLVE`` from the last stage: 1 when the solve of ``mb`` stops here.
        z: the iterate (forward) or the gradient of the receiver's output (backward),
            (b, l_local, d).
        u: the injection (b, l, inj) travelling with ``mb``'s first forward message.
        gu: backward, step 1: the injection gradient summed over the stages behind the sender.
    """

    kind: int
    mb: int = -1
    step: int = 0
    flag: int = 0
    z: torch.Tensor | None = None
    u: torch.Tensor | None = None
    gu: torch.Tensor | None = None

    @property
    def parts(self) -> int:
        return (
            (P_Z if self.z is not None else 0)
            | (P_U if self.u is not None else 0)
            | (P_GU if self.gu is not None else 0)
        )


NONE = Message(K_NONE)


def _tensor_parallel_slices() -> tuple[dist.ProcessGroup | None, int, int]:
    """(TP group, TP rank, TP size) when the iterate is replicated over a TP group of size > 1
    (tensor parallelism without sequence parallelism); (None, 0, 1) otherwise."""
    from ilm_megatron.core.parallel_state import tp_group, tp_rank, tp_world_size
    from ilm_megatron.core.tensor_parallel import sequence_parallel_active

    tp = tp_world_size()
    if tp == 1 or sequence_parallel_active():
        return None, 0, 1
    return tp_group(), tp_rank(), tp


class RingTransport:
    """Paired ``batch_isend_irecv`` exchanges with the two ring neighbours of one stage.

    Args:
        ranks: global ranks of stages ``0..P-1`` (this rank's pipeline group).
        pp_rank: this stage.
        device: where buffers live (the stage's parameters' device).
        group: the pipeline process group (None: the default group).
        z_shape / z_dtype: the iterate this stage stores (b, l_local, d) and its dtype.
        u_shape / u_dtype: the injection's shape and dtype (None for explicit models).
        wire_dtype: dtype of iterates and gradients on the wire (None: ``z_dtype``).
    """

    def __init__(
        self,
        ranks: Sequence[int],
        pp_rank: int,
        device: torch.device,
        group: dist.ProcessGroup | None,
        z_shape: Sequence[int],
        z_dtype: torch.dtype,
        u_shape: Sequence[int] | None,
        u_dtype: torch.dtype | None,
        wire_dtype: torch.dtype | None = None,
    ) -> None:
        P = len(ranks)
        self.P, self.rank = P, pp_rank
        self.next_rank, self.prev_rank = ranks[(pp_rank + 1) % P], ranks[(pp_rank - 1) % P]
        self.device, self.group = device, group
        self.z_shape, self.z_dtype = tuple(z_shape), z_dtype
        self.u_shape, self.u_dtype = (tuple(u_shape) if u_shape else None), u_dtype
        self.wire = wire_dtype or z_dtype
        self.tp_group, self.tp_rank, self.tp = _tensor_parallel_slices()
        numel = 1
        for n in self.z_shape:
            numel *= n
        self.numel = numel
        self.chunk = -(-numel // self.tp)  # elements of a 1/tp slice (the last one padded)
        self.live = {"next": True, "prev": True}  # the links to stage s+1 and from stage s-1
        self.sent: Counter[str] = Counter()
        self.messages: Counter[str] = Counter()
        self.wait_s = 0.0
        self.wait_by: Counter[str] = Counter()  # seconds blocked: "header", "payload", "embedding"

    # ------------------------------------------------------------------ links
    @property
    def open(self) -> bool:
        """True while a link is live (the stage must keep exchanging)."""
        return self.live["next"] or self.live["prev"]

    def _links(self) -> list[str]:
        """This stage's live links in the canonical order: by link index (``next`` is link
        ``s``, ``prev`` is link ``s - 1 mod P``)."""
        order = ["next", "prev"] if self.rank == 0 else ["prev", "next"]
        return [name for name in order if self.live[name]]

    # ------------------------------------------------------------------ wire format
    def _to_wire(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.detach().to(self.wire).reshape(-1)
        if self.tp == 1:
            return flat.contiguous()
        lo = self.tp_rank * self.chunk
        part = flat[lo : lo + self.chunk]
        if part.numel() < self.chunk:
            part = torch.cat([part, part.new_zeros(self.chunk - part.numel())])
        return part.contiguous()

    def _wire_buffer(self) -> torch.Tensor:
        n = self.numel if self.tp == 1 else self.chunk
        return torch.empty(n, dtype=self.wire, device=self.device)

    def _from_wire(self, buf: torch.Tensor) -> torch.Tensor:
        if self.tp > 1:  # the slices of the TP group's ranks, in rank order
            parts = [torch.empty_like(buf) for _ in range(self.tp)]
            dist.all_gather(parts, buf, group=self.tp_group)
            buf = torch.cat(parts)[: self.numel]
        return buf.view(self.z_shape).to(self.z_dtype)

    # ------------------------------------------------------------------ exchange
    def _run(self, ops: list[dist.P2POp], phase: str) -> None:
        if not ops:
            return
        t0 = time.perf_counter()
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        dt = time.perf_counter() - t0
        self.wait_s += dt
        self.wait_by[phase] += dt

    def exchange(self, fwd: Message, bwd: Message) -> tuple[Message, Message]:
        """Send ``fwd`` to stage ``s + 1`` and ``bwd`` to stage ``s - 1``; receive the forward
        message from ``s - 1`` and the backward one from ``s + 1``. A message on a dead link is
        dropped; a dead link's incoming message is ``K_STOP``. Collective with both neighbours.

        Returns:
            ``(forward message in, backward message in)`` for the next tick.
        """
        out = {"next": fwd, "prev": bwd}
        peer = {"next": self.next_rank, "prev": self.prev_rank}
        links = self._links()
        # 1. headers
        hdr_in = {n: torch.empty(HEADER, dtype=torch.int32, device=self.device) for n in links}
        ops = []
        for name in links:
            m = out[name]
            h = torch.tensor([m.kind, m.mb, m.step, m.flag, m.parts], dtype=torch.int32)
            ops.append(dist.P2POp(dist.isend, h.to(self.device), peer[name], self.group))
            ops.append(dist.P2POp(dist.irecv, hdr_in[name], peer[name], self.group))
            self.sent["header"] += HEADER * 4
        self._run(ops, "header")
        heads = {name: [int(x) for x in hdr_in[name].tolist()] for name in links}
        # 2. payloads, in the same order on both ends
        ops, recv = [], {}
        for name in links:
            m, (kind, mb, step, flag, parts) = out[name], heads[name]
            kind_out = "iterate" if name == "next" else "grad"
            if m.z is not None:
                ops.append(dist.P2POp(dist.isend, self._to_wire(m.z), peer[name], self.group))
                self.sent[kind_out] += ops[-1].tensor.numel() * ops[-1].tensor.element_size()
                self.messages[kind_out] += 1
            for t, key in ((m.u, "injection"), (m.gu, "injection_grad")):
                if t is not None:
                    t = t.detach().to(self.u_dtype).contiguous()
                    ops.append(dist.P2POp(dist.isend, t, peer[name], self.group))
                    self.sent[key] += t.numel() * t.element_size()
            bufs: dict[str, torch.Tensor] = {}
            if parts & P_Z:
                bufs["z"] = self._wire_buffer()
            if parts & P_U:
                bufs["u"] = torch.empty(self.u_shape, dtype=self.u_dtype, device=self.device)
            if parts & P_GU:
                bufs["gu"] = torch.empty(self.u_shape, dtype=self.u_dtype, device=self.device)
            for t in bufs.values():
                ops.append(dist.P2POp(dist.irecv, t, peer[name], self.group))
            recv[name] = bufs
        self._run(ops, "payload")
        # 3. what arrived; links on which a stop went either way are dead from now on
        got = {}
        for name in ("prev", "next"):
            if name not in heads:
                got[name] = Message(K_STOP)
                continue
            kind, mb, step, flag, _ = heads[name]
            bufs = recv[name]
            z = self._from_wire(bufs["z"]) if "z" in bufs else None
            got[name] = Message(kind, mb, step, flag, z, bufs.get("u"), bufs.get("gu"))
            if kind == K_STOP or out[name].kind == K_STOP:
                self.live[name] = False
        return got["prev"], got["next"]

    def all_reduce_pair(self, t: torch.Tensor, other: int, group: dist.ProcessGroup | None) -> None:
        """Sum ``t`` in place with the same tensor on stage ``other`` (global rank): over
        ``group`` (Megatron's embedding group, the default backend) when given, else by a paired
        exchange on the pipeline group. Both ends get the same bits (two-term sums commute)."""
        self.sent["embedding"] += t.numel() * t.element_size()
        if group is not None:
            dist.all_reduce(t, group=group)
            return
        theirs = torch.empty_like(t)
        ops = [
            dist.P2POp(dist.isend, t.contiguous(), other, self.group),
            dist.P2POp(dist.irecv, theirs, other, self.group),
        ]
        self._run(ops, "embedding")
        t.add_(theirs)


__all__ = [
    "HEADER",
    "K_BWD",
    "K_DONE",
    "K_NONE",
    "K_PHANTOM",
    "K_SOLVE",
    "K_STOP",
    "NONE",
    "Message",
    "RingTransport",
]
