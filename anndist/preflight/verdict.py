"""The pre-flight rules: from every rank's facts and figures (on rank 0) to the problems, each naming
its ranks and hosts. Pure functions, so any job's records can be judged in a test.

"fail": the job is set up wrong (software differs, the launcher's layout is inconsistent, the
checkpoint folder cannot take a checkpoint). "lag": a rank or node is slower than the others
(compute, or its link to rank 0, against the median of the other ranks: ``lagging.py``).
"""
from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

from ..dist.lagging import median_of_others, versus_others
from .facts import SOFTWARE

LOW_CPU_SHARE = 0.8  # below this, the rank did not have a core to itself while it computed


@dataclass
class Problem:
    kind: str  # "fail" or "lag"
    text: str
    ranks: list[int] = field(default_factory=list)

    def where(self, records: Sequence[dict[str, Any]]) -> str:
        hosts = sorted({records[r]["host"] for r in self.ranks})
        shown = ", ".join(hosts[:8]) + (f", ... ({len(hosts)} hosts)" if len(hosts) > 8 else "")
        return f"rank(s) {_ranks(self.ranks)} on {shown}" if self.ranks else "the job"


def judge(records: Sequence[dict[str, Any]], links: dict[int, dict[str, float]], threshold: float,
          checkpoint_bytes: int | None) -> list[Problem]:
    """Every problem found in ``records`` (one dict per rank, in rank order) and rank 0's ``links``."""
    return [*software(records), *layout(records), *compute(records, threshold),
            *slow_links(records, links, threshold), *folder(records, checkpoint_bytes)]


def software(records: Sequence[dict[str, Any]]) -> list[Problem]:
    problems = []
    for key in SOFTWARE:
        values = [r[key] for r in records]
        counts = Counter(values)
        if len(counts) < 2:
            continue
        usual = max(counts, key=lambda v: (counts[v], v == values[0]))  # a tie goes to rank 0's
        odd = [r["rank"] for r in records if r[key] != usual]
        shown = sorted({str(records[r][key]) for r in odd})
        problems.append(Problem("fail", f"{key} is {' / '.join(shown)} where the other {len(records) - len(odd)} "
                                        f"rank(s) have {usual}", odd))
    return problems


def layout(records: Sequence[dict[str, Any]]) -> list[Problem]:
    """World size = nodes x processes per node, distinct local ranks and devices, threads within cores."""
    by_host: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_host[record["host"]].append(record)
    problems = [*_node_counts(records, by_host)]
    for host, ranks in by_host.items():
        numbers = [r["rank"] for r in ranks]
        local = sorted(r["local_rank"] for r in ranks)
        sizes = sorted({r["local_world_size"] for r in ranks})
        if sizes != [len(ranks)] or local != list(range(len(ranks))):
            problems.append(Problem("fail", f"{host} runs {len(ranks)} rank(s) with local ranks {local} and local "
                                            f"world size {'/'.join(map(str, sizes))}: expected local ranks 0.."
                                            f"{len(ranks) - 1} and local world size {len(ranks)}", numbers))
        devices = Counter(r["device_id"] for r in ranks if r["device_id"] is not None)
        shared = [r["rank"] for r in ranks if devices.get(r["device_id"], 0) > 1]
        if shared:
            problems.append(Problem("fail", f"ranks share a GPU on {host} ({', '.join(sorted({records[r]['device'] for r in shared}))}): "
                                            "one GPU per local rank, cuda:LOCAL_RANK", shared))
        threads = sum(r["threads"] for r in ranks)
        cores = len(set().union(*(r["cpus"] for r in ranks)))
        if threads > cores:
            problems.append(Problem("fail", f"{len(ranks)} rank(s) x their threads ({threads} in all) exceed the "
                                            f"{cores} core(s) they may run on, on {host}: set OMP_NUM_THREADS or fewer "
                                            "processes per node", numbers))
    return problems


def _node_counts(records: Sequence[dict[str, Any]], by_host: dict[str, list]) -> list[Problem]:
    problems, hosts, world = [], len(by_host), len(records)
    per_node = sorted({len(ranks) for ranks in by_host.values()})
    if len(per_node) > 1 or hosts * per_node[0] != world:
        counts = ", ".join(f"{h} {len(r)}" for h, r in by_host.items())
        problems.append(Problem("fail", f"world size {world} is not nodes x processes per node: ranks per host {counts}"))
    for name, nodes in records[0]["nodes_stated"].items():
        if nodes != hosts:
            problems.append(Problem("fail", f"{name}={nodes} nodes, but the ranks run on {hosts} host(s) "
                                            f"({', '.join(by_host)}): two nodes with one name, or a launch on the wrong "
                                            "nodes (--nnodes, srun -N)"))
    job_nodes = records[0]["job_nodes"]
    if job_nodes is not None and job_nodes > hosts:
        problems.append(Problem("fail", f"the Slurm job holds {job_nodes} nodes but ranks run on {hosts}: the others "
                                        "stay idle (#SBATCH --nodes against the launch)"))
    return problems


def compute_ratios(records: Sequence[dict[str, Any]]) -> list[float]:
    """Each rank's speed against the median of the others, per round, then the median over rounds."""
    rounds = min(len(r["compute"]["gflops"]) for r in records)
    per_round = [versus_others([r["compute"]["gflops"][i] for r in records]) for i in range(rounds)]
    return [_median([round_[rank] for round_ in per_round]) for rank in range(len(records))]


def compute(records: Sequence[dict[str, Any]], threshold: float) -> list[Problem]:
    problems = []
    for record, ratio in zip(records, compute_ratios(records)):
        if ratio < threshold:
            share = _median(record["compute"]["cpu_share"])
            why = (f"; it had a CPU {share:.0%} of the time: another busy process shares its core(s)"
                   if record["device"] == "cpu" and share < LOW_CPU_SHARE else "")
            problems.append(Problem("lag", f"compute {_median(record['compute']['gflops']):.1f} GFLOP/s is {ratio:.2f}x "
                                           f"the median of the other ranks (below {threshold}x){why}", [record["rank"]]))
    return problems


def slow_links(records: Sequence[dict[str, Any]], links: dict[int, dict[str, float]],
               threshold: float) -> list[Problem]:
    """Links from rank 0 to the other nodes, against each other (the link inside rank 0's node differs in kind)."""
    remote = [peer for peer in sorted(links) if records[peer]["host"] != records[0]["host"]]
    problems = []
    for i, peer in enumerate(remote):
        bandwidth = versus_others([links[p]["mb_s"] for p in remote])[i]
        latency = median_of_others([links[p]["latency_us"] for p in remote], i)
        slow_bw = bandwidth < threshold
        slow_lat = not math.isnan(latency) and links[peer]["latency_us"] * threshold > latency
        if slow_bw or slow_lat:
            problems.append(Problem("lag", f"link to rank 0: {links[peer]['latency_us']:.0f} us, "
                                           f"{links[peer]['mb_s']:.0f} MB/s, against {latency:.0f} us and "
                                           f"{links[peer]['mb_s'] / bandwidth:.0f} MB/s to the other nodes", [peer]))
    return problems


def folder(records: Sequence[dict[str, Any]], checkpoint_bytes: int | None) -> list[Problem]:
    probes = [(r["rank"], r["folder"]) for r in records if r.get("folder") is not None]
    if not probes:
        return []
    problems = []
    failed = [rank for rank, probe in probes if probe["error"]]
    if failed:
        problems.append(Problem("fail", f"checkpoint_dir cannot be written: {records[failed[0]]['folder']['error']}",
                                failed))
    unseen = [rank for rank, probe in probes if probe["shared"] is False and rank not in failed]
    if unseen and not records[0]["folder"]["error"]:
        problems.append(Problem("fail", "checkpoint_dir is not one shared folder: these ranks cannot read the file "
                                        "rank 0 wrote there, so a resume on other nodes would not find the checkpoint",
                                unseen))
    if checkpoint_bytes:
        short = [rank for rank, probe in probes if probe["free_bytes"] is not None and probe["free_bytes"] < checkpoint_bytes]
        if short:
            free = min(records[r]["folder"]["free_bytes"] for r in short)
            problems.append(Problem("fail", f"checkpoint_dir has {_gib(free)} free, less than a checkpoint "
                                            f"({_gib(checkpoint_bytes)})", short))
    return problems


def _median(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def _ranks(ranks: Sequence[int]) -> str:
    return ", ".join(map(str, ranks)) if len(ranks) <= 8 else f"{', '.join(map(str, ranks[:8]))}, ... ({len(ranks)})"
