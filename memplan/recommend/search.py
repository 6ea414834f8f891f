"""The plan search: every supported combination of precision regime, optimizer, sharding / ZeRO stage /
offload, checkpointing, attention and loss for one method, each at the largest micro-batch that fits,
scored by the estimator (memory, with headroom) and the time model (`throughput`).

Memory grows with the micro-batch, so each combination needs only a binary search over the divisors of
the per-GPU batch (the accumulation makes up the rest of the effective batch): about log2(divisors)
estimates instead of one per micro-batch.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from memplan.catalog.spec import ModelSpec
from memplan.errors import UserError
from memplan.estimator import Estimate, estimate
from memplan.estimator.activations import attention_runs
from memplan.estimator.search import largest
from memplan.plan import Plan, build_plan
from memplan.recommend import hparams, throughput
from memplan.recommend.hardware import Target

PRIORITIES = ("quality", "speed", "memory")


@dataclass(frozen=True)
class Workload:
    """What is trained: tokens per example, examples per epoch, the effective batch and the epochs."""

    seq_len: int
    effective_batch: int
    examples_per_epoch: int
    epochs: float

    def steps(self, plan: Plan) -> int:
        return throughput.optimizer_steps(self.examples_per_epoch, plan.micro_batch, plan.world_size,
                                          plan.grad_accum, self.epochs)


@dataclass
class Candidate:
    plan: Plan
    estimate: Estimate
    step: throughput.StepTime
    steps: int
    fits: bool
    # fits only with its caching allocator releasing its cache in every step (Scorer.decide's last resort): this
    # many times per step, which slows the step by an amount the time model does not know
    releases: int = 0
    rank_key: tuple | None = field(default=None, compare=False, repr=False)  # its key where `rank` sorted it

    @property
    def hours(self) -> float:
        return self.step.total_s * self.steps / 3600

    @property
    def total(self) -> int:
        return self.estimate.total

    @property
    def quality_cost(self) -> int:
        """0 = nothing traded for memory. Pure bf16 weights lose updates smaller than bf16's resolution
        (2^-8 relative: a 2e-5 step vanishes on most weights) in full FT; 8-bit optimizer states quantize
        Adam's moments (Dettmers et al. 2022 report parity, but it is a change)."""
        p = self.plan
        cost = 2 if (p.method == "full" and p.precision == "bf16") else 0
        return cost + (1 if "8bit" in p.optimizer else 0)

    @property
    def complexity(self) -> int:
        """Tie-break toward the simpler plan: fewer moving parts when time and quality are equal."""
        p = self.plan
        return (p.zero + (2 if p.offload != "none" else 0) + (p.sharding != "ddp") + (p.loss == "chunked")
                + (p.attn == "flash") + (p.precision == "bf16-master"))

    def family(self) -> str:
        from memplan.report.estimate import describe_plan

        return describe_plan(self.estimate)

    def key(self, priority: str) -> tuple:
        """The order of a search's plans, best first (`rank`). Equal times and costs: the less memory, the allocated
        peak here; where that ties too, the total, which needs the step replayed through the allocator model (a plan
        that fits with RESERVE_BOUND to spare is otherwise spared it): `rank` settles those ties where the order is
        read."""
        hours = round(self.hours, 6)
        if priority == "speed":
            return (hours, self.quality_cost, self.complexity, self.estimate.least_total)
        if priority == "memory":
            return (self.total, hours, self.quality_cost, self.complexity)
        return (self.quality_cost, hours, self.complexity, self.estimate.least_total)


def layout(c: Candidate) -> tuple:
    """The data-parallel layout of a candidate: its method, sharding, ZeRO stage and offload."""
    p = c.plan
    return (p.method, p.sharding, p.zero, p.offload)


def rank(fitting: list[Candidate], priority: str) -> None:
    """Sort `fitting` best first by Candidate.key, plans whose keys tie by their total memory where the order is
    read: the first plan, and the first of each layout (recommend's alternatives). Other ties keep the search's
    order, and their plans are not replayed; `settle_first` settles the first again once it is removed."""
    for c in fitting:
        c.rank_key = c.key(priority)
    fitting.sort(key=lambda c: c.rank_key)
    seen: set[tuple] = set()
    start = 0
    while start < len(fitting):
        end = start + 1
        while end < len(fitting) and fitting[end].rank_key == fitting[start].rank_key:
            end += 1
        layouts = {layout(c) for c in fitting[start:end]}
        if end - start > 1 and (start == 0 or layouts - seen):
            fitting[start:end] = sorted(fitting[start:end], key=lambda c: c.total)
        seen |= layouts
        start = end


def settle_first(fitting: list[Candidate]) -> None:
    """Order by total the plans that tie with the first (`rank`): the first is then the best."""
    end = 1
    while end < len(fitting) and fitting[end].rank_key is not None and fitting[end].rank_key == fitting[0].rank_key:
        end += 1
    if end > 1:
        fitting[:end] = sorted(fitting[:end], key=lambda c: c.total)


@dataclass
class SearchResult:
    method: str
    fitting: list[Candidate]  # best first, by the priority
    not_fitting: list[Candidate]  # one per combination, at micro-batch 1 (its smallest memory)
    scored: int  # plans scored (estimate + time)
    considered: int  # plans decided, including those ruled out by monotonicity
    limit: int  # usable bytes per device

    @property
    def best(self) -> Candidate | None:
        return self.fitting[0] if self.fitting else None

    def smallest(self) -> Candidate | None:
        return smallest(self.fitting + self.not_fitting)


def smallest(candidates: Iterable[Candidate]) -> Candidate | None:
    """The candidate with the least total, replaying the allocations of only those that can have it: a total is
    never below the allocated peak and the context (Estimate.least_total), so the candidates are taken by that
    bound until it passes the least total found."""
    best = None
    for c in sorted(candidates, key=lambda c: c.estimate.least_total):
        if best is not None and c.estimate.least_total >= best.total:
            break
        if best is None or c.total < best.total:
            best = c
    return best


# ------------------------------------------------------------------------------- the search space


def precisions(target: Target, method: str) -> list[str]:
    """Regimes the hardware runs: bf16 ones where the device has bf16 (Ampere+), else fp16 AMP; fp32 on
    GPUs without bf16. On the CPU fp32, and the bf16 regimes where its instruction set multiplies bf16
    (hardware.bf16_class; without it bf16 matmuls run about 20 x slower than fp32), or for QLoRA, which
    computes in bf16 anyway."""
    if target.device == "cpu":
        slow = target.cpu is not None and target.cpu.bf16 == "none"
        out = ["fp32"] if slow and method != "qlora" else ["fp32", "amp-bf16", "bf16"]
    elif target.supports_bf16:
        out = ["amp-bf16", "bf16", "bf16-master"]
    else:
        out = ["amp-fp16", "fp32"]
    if method == "qlora":
        out = [p for p in out if p != "fp32"]
    return out


def optimizers(target: Target) -> list[str]:
    """Fused AdamW (no foreach temporaries, the fastest torch AdamW) and, where it is needed to fit,
    bitsandbytes' 8-bit AdamW (its CPU kernels run too; for adapters `search` tries it last)."""
    return ["adamw-fused", "adamw-8bit"]


def shardings(target: Target) -> list[tuple[str, int, str]]:
    """(backend, ZeRO stage, offload). On one GPU sharding has nothing to split, so only offload is worth
    its cost there; on a CPU there is no DeepSpeed and nothing to offload to."""
    n = target.world_size
    if target.device == "cpu":
        return [("ddp", 0, "none")] + ([("fsdp", 2, "none"), ("fsdp", 3, "none")] if n > 1 else [])
    offloaded = [("deepspeed", 1, "optimizer"), ("deepspeed", 2, "optimizer"), ("deepspeed", 3, "optimizer"),
                 ("deepspeed", 3, "optimizer+params"), ("fsdp", 3, "optimizer+params")]
    if n == 1:
        return [("ddp", 0, "none")] + offloaded
    return [("ddp", 0, "none"), ("fsdp", 2, "none"), ("fsdp", 3, "none"), ("deepspeed", 1, "none"),
            ("deepspeed", 2, "none"), ("deepspeed", 3, "none")] + offloaded


def attentions(spec: ModelSpec, target: Target, precision: str) -> list[str]:
    """SDPA (torch's fused kernels, no extra package) everywhere; flash-attention 2 on GPUs in 16-bit. Eager
    attention is searched only in place of SDPA: it saves the full attention matrices (more memory) for the
    same FLOPs, so SDPA dominates it. What the model runs decides (activations.attention_runs): eager for a
    model without an SDPA path (its "sdpa" is eager, not another choice), no flash where it has none."""
    asked = ["sdpa", "flash"] if target.device == "cuda" and precision != "fp32" and target.supports_bf16 else ["sdpa"]
    return [attn for attn in dict.fromkeys(attention_runs(spec, a) for a in asked) if attn is not None]


def search_lora(spec: ModelSpec, model_ref: str, lora: dict | None) -> dict:
    """The LoRA settings searched: as asked, with dropout 0 (unless asked) where a fused MoE expert stack is a
    target under them, since peft's ParamWrapper takes no dropout (plan.check_lora_targets). Stacks that are
    no target keep the dropout: attention-only targets, and models whose stacks peft cannot reach
    (Traits.lora_unreachable: GPT-OSS, Llama 4)."""
    lora = dict(lora or {})
    try:
        plan = build_plan(dict(model=model_ref, method="lora", lora=lora))
    except UserError:  # settings no plan takes: every combination is refused as it is built
        return lora
    if spec.lora_expert_stacks(plan.lora.targets):
        lora.setdefault("dropout", 0.0)
    return lora


def structures(spec: ModelSpec, model_ref: str, method: str, target: Target, seq_len: int,
               lora: dict | None = None, allow_param_offload: bool = True) -> list[Plan]:
    """Every valid combination (micro-batch 1), validated once by the Plan's own rules."""
    base = dict(model=model_ref, method=method, device=target.device, gpus=target.gpus, nodes=target.nodes,
                seq_len=seq_len)
    lora = search_lora(spec, model_ref, lora) if method != "full" else dict(lora or {})
    if lora:
        base["lora"] = lora
    out = []
    for precision, optimizer, (backend, zero, offload), ckpt, loss in itertools.product(
            precisions(target, method), optimizers(target), shardings(target), (False, True), ("standard", "chunked")):
        if offload == "optimizer+params" and not allow_param_offload:
            continue
        if offload == "optimizer" and method != "full":
            # an adapter's optimizer states are a few MiB: offloading them frees nothing a plan needs and adds a CPU
            # step (parameter offload, which moves the frozen base, stays)
            continue
        if precision == "bf16-master" and backend != "deepspeed":
            # DDP: the same 16 B per parameter as amp-bf16, nothing gained; FSDP on CUDA: memplan train
            # refuses it (accelerate prepares FSDP's optimizer over the model's own parameters).
            continue
        for attn in attentions(spec, target, precision):
            fields = dict(base, precision=precision, optimizer=optimizer, sharding=backend, zero=zero, offload=offload,
                          grad_ckpt=ckpt, attn=attn, loss=loss)
            try:
                out.append(build_plan(fields))
            except UserError:  # an unsupported combination (plan_problems): not a candidate
                continue
    return out


def per_gpu_batch(effective_batch: int, world: int) -> int:
    """Sequences each GPU handles per optimizer step (the effective batch rounded up to the world size)."""
    return max(1, math.ceil(effective_batch / world))


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose(methods: Iterable[str], fitting: dict[str, list[Candidate]]) -> Candidate | None:
    """THE rule of "best", for `recommend` and `estimate` alike: among the methods in order, the first that
    fits without parameter offload (a last resort: it streams every weight over PCIe each step), else the
    first that fits at all; within that method the first of its fitting plans (each list best first)."""
    methods = list(methods)
    for plans in fitting.values():
        settle_first(plans)
    for m in methods:
        if any(c.plan.offload != "optimizer+params" for c in fitting.get(m, [])):
            return fitting[m][0]
    for m in methods:
        if fitting.get(m):
            return fitting[m][0]
    return None


def choose_fitting(methods: Iterable[str], fitting: dict[str, list[Candidate]], target: Target) -> Candidate | None:
    """`choose`, the chosen plan's fit confirmed by its replayed reserved memory: a plan the search took on
    RESERVE_BOUND that does not fit once replayed is marked so, dropped from `fitting` (the lists are
    changed) and the choice made again."""
    methods = list(methods)
    while (chosen := choose(methods, fitting)) is not None:
        if target.fits(chosen.estimate):
            return chosen
        chosen.fits = False
        fitting[chosen.plan.method].remove(chosen)
    return None


# ------------------------------------------------------------------------------- scoring


#: Step times closer than this are one to the plan choice: the time model's error on held-out steps is several
#: percent (throughput.HELD_OUT_ERROR), so a 0.1 % gain does not buy a moving part (ZeRO-1 for a LoRA plan's
#: few states).
SAME_TIME = 0.01
#: The search takes a plan whose allocated peak fits with this much more as fitting without replaying its
#: allocations: above the largest reserve measured on the H100 (+24.5 %, gpt2 with checkpointing and eager attention)
#: and the largest replayed over 1,480 one-GPU plans (every preset under eight kinds of plan, and the small models
#: at micro-batch 1-8 x 512-2048 tokens): +47.6 %, gpt2 QLoRA in bf16 (small models, whose loss tensors dwarf
#: the rest). The plan it recommends is replayed and checked (choose_fitting), so a plan beyond the bound costs a
#: second choice, not a wrong verdict.
RESERVE_BOUND = 0.50
#: The recommended plan runs PyTorch's allocator with expandable segments where, replayed, they lower its reserved
#: memory by at least this much (Scorer.lower_reserve); any plan runs them where only they let it fit.
EXPANDABLE_GAIN = 0.02


def _prefer_simpler(fitting: list[Candidate], priority: str, usable: int) -> None:
    """Put first the simplest plan among those as good as the first: the same quality cost (and, for "memory",
    the same memory) and a time within SAME_TIME of the first's. Before simplicity: a plan that fits with the
    allocator's cache kept (one that needs it released, even once, runs those steps more slowly than the time
    model says), then one whose accumulation is within the recommended range."""
    if not fitting or priority == "memory":
        return
    first = fitting[0]
    peers = [c for c in fitting if c.quality_cost == first.quality_cost and c.hours <= first.hours * (1 + SAME_TIME)]
    lo, hi = hparams.ACCUM_RANGE

    def order(c: Candidate) -> tuple:
        return (c.estimate.cache_releases(usable) != (0, 0), not lo <= c.plan.grad_accum <= hi, c.complexity,
                c.key(priority))

    best = min(order(c) for c in peers)
    simplest = min((c for c in peers if order(c) == best), key=lambda c: c.total)
    fitting.remove(simplest)
    fitting.insert(0, simplest)


class Scorer:
    """Estimates and step times, memoized per plan (the tree and the method search share plans)."""

    def __init__(self, spec: ModelSpec, target: Target,
                 padded_length: Callable[[int, int], float] | None = None):
        """padded_length(micro_batch, seq_len): tokens per sequence as batches run (from --data)."""
        self.spec, self.target, self.padded_length = spec, target, padded_length
        self._cache: dict[tuple, Candidate] = {}
        self.scored = 0

    def score(self, plan: Plan, workload: Workload) -> Candidate:
        key = (plan.model_dump_json(), workload)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        fits, e = self.decide(estimate(self.spec, plan, self.target.memory_bytes))
        plan = e.plan
        seq_tokens = self.padded_length(plan.micro_batch, plan.seq_len) if self.padded_length else None
        step = throughput.step_time(self.spec, plan, self.target, e.params_trainable, seq_tokens)
        cand = Candidate(plan=plan, estimate=e, step=step, steps=workload.steps(plan), fits=fits,
                         releases=self._releases(e) if fits else 0)
        self._cache[key] = cand
        self.scored += 1
        return cand

    def decide(self, e: Estimate) -> tuple[bool, Estimate]:
        """Whether the plan fits (Target.fits), and its estimate with the allocator it should run.

        The step's allocations are replayed only where the verdict depends on them: reserved is at least the
        allocated peak, and a plan that fits with RESERVE_BOUND more than its allocated peak is taken as
        fitting (`choose_fitting` replays the one the search picks). A plan whose total does not fit with the
        default allocator is replayed with expandable segments, which it runs if they let it fit; failing that,
        it fits if an allocator releasing its cache serves it within the device (Estimate.total_within), with
        whichever of the two releases it less often."""
        target = self.target
        if not (target.host_fits(e.host_bytes) and target.device_fits(e.least_total)):
            return False, e
        if target.device_fits(e.least_total + int(e.peak_allocated * RESERVE_BOUND)):
            return True, e
        if target.device_fits(e.total):
            return True, e
        if e.replayed is None:
            return False, e
        alt = None
        if e.plan.allocator == "default":
            alt = estimate(self.spec, e.plan.model_copy(update={"allocator": "expandable"}), target.memory_bytes)
            if target.device_fits(alt.total):
                return True, alt
        held = [x for x in (e, alt) if x is not None and target.device_holds(x)]
        if not held:
            return False, e
        return True, min(held, key=lambda x: x.cache_releases(target.usable_bytes)[::-1])  # fewest per step, then first

    def _releases(self, e: Estimate) -> int:
        """The cache releases per step of a plan `decide` took (0 unless it fits only releasing the cache)."""
        t = self.target
        if t.device_fits(e.least_total + int(e.peak_allocated * RESERVE_BOUND)) or t.device_fits(e.total):
            return 0
        return e.cache_releases(t.usable_bytes)[1]

    def lower_reserve(self, c: Candidate) -> Candidate:
        """The candidate with expandable segments where they lower its reserved memory by EXPANDABLE_GAIN or more
        (replayed; the plan recommend writes), else itself."""
        e = c.estimate
        if e.plan.allocator != "default" or e.replayed is None:
            return c
        if e.reserved <= e.peak_allocated * (1 + EXPANDABLE_GAIN):  # too little cached beyond the tensors to save
            return c
        alt = estimate(self.spec, e.plan.model_copy(update={"allocator": "expandable"}), self.target.memory_bytes)
        if alt.reserved > e.reserved * (1 - EXPANDABLE_GAIN) or not self.target.device_holds(alt):
            return c
        return dataclasses.replace(c, plan=alt.plan, estimate=alt)


def largest_micro_batch(plan: Plan, workload: Workload, scorer: Scorer) -> tuple[Candidate | None, Candidate, int]:
    """(the plan at the largest micro-batch that fits, or None; the micro-batch-1 candidate; plans decided). A
    micro-batch that fits only with the caching allocator releasing its cache in every step gives way to the
    largest that fits without, where one does.

    The micro-batches are the divisors of the sequences each GPU handles per step, the rest made up by
    gradient accumulation, so that every one keeps the effective batch."""
    per_gpu = per_gpu_batch(workload.effective_batch, plan.world_size)
    sizes = divisors(per_gpu)

    def at(mb: int) -> Candidate:
        return scorer.score(plan.model_copy(update={"micro_batch": mb, "grad_accum": per_gpu // mb}), workload)

    best = largest(lambda mb: at(mb).fits, sizes)
    if best and at(best).releases:  # the largest that fits without releasing the cache every step, if one does
        best = largest(lambda mb: at(mb).fits and not at(mb).releases, sizes[:sizes.index(best)]) or best
    return (at(best) if best else None), at(1), len(sizes)


def with_samples(plan: Plan, workload: Workload) -> Plan:
    """The plan with the examples memplan train will tokenize in each process (an epoch's, replay included),
    which its host RAM counts (memplan.estimator.host.dataset_bytes); the recommended plan states the training
    examples alone, so never more than was searched."""
    if plan.data.samples:
        return plan
    return plan.model_copy(update={"data": plan.data.model_copy(update={"samples": workload.examples_per_epoch})})


def search(spec: ModelSpec, model_ref: str, method: str, target: Target, workload: Workload, priority: str,
           scorer: Scorer, lora: dict | None = None, allow_param_offload: bool = True,
           progress: Callable[[Iterable], Iterable] | None = None) -> SearchResult:
    fitting, not_fitting = [], []
    before, considered = scorer.scored, 0
    plans = [with_samples(p, workload) for p in
             structures(spec, model_ref, method, target, workload.seq_len, lora, allow_param_offload)]
    # an adapter's optimizer states are a few hundred MiB at most: its 8-bit moments are searched only where
    # nothing fits without them (they cost quality, and a replay each)
    late = [method != "full" and p.optimizer == "adamw-8bit" for p in plans]
    first = [p for p, is_late in zip(plans, late) if not is_late]
    last_resort = [p for p, is_late in zip(plans, late) if is_late]
    for batch in (first, last_resort):
        if batch is last_resort and fitting:
            break
        for plan in (progress(batch) if progress else batch):
            best, smallest, decided = largest_micro_batch(plan, workload, scorer)
            considered += decided
            (fitting if best else not_fitting).append(best or smallest)
    rank(fitting, priority)
    _prefer_simpler(fitting, priority, target.usable_bytes)
    not_fitting.sort(key=lambda c: c.estimate.peak_allocated)
    return SearchResult(method=method, fitting=fitting, not_fitting=not_fitting, scored=scorer.scored - before,
                        considered=considered, limit=target.usable_bytes)
