"""Multiruns through a real SLURM cluster (sbatch, sacct, scontrol), as `python run.py -m hydra/launcher=slurm_cpu`:
two tiny jobs and their aggregated table, a sweep with a failing job, sbatch refusing a GPU on a CPU partition, and a
policy-gradient job requeued twice mid-run (a hard requeue, then submitit's checkpoint on SIGUSR2) that ends with the
mask of an uninterrupted run. Without a cluster these skip (sbatch not on PATH, or no `cpu` partition with a node up),
unless LLMSP_REQUIRE_SLURM=1 (set by .ci/run once .ci/slurm_up.sh could install SLURM), where that is a failure.

The job folder names (flat, path-valued keys left out) and the one-line sbatch hints are checked without a cluster.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from llmsp.prune.errors import sbatch_hint
from llmsp.sweeps import aggregate as agg

TINY = ["model=tiny_llama_gqa", "dtype=float32", "layer_range=all", "calibration.n_samples=8",
        "evaluate.ppl.max_windows=2"]
# one CPU and 2 GB per job, so the two jobs of a sweep run side by side on a 2-core node
SLURM_CPU = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
             "hydra.launcher.timeout_min=30"]


def multirun(sweep, *overrides, timeout=600, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "run.py"), "-m", f"hydra.sweep.dir={sweep}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def job_dirs(sweep) -> list[str]:
    """The job folders of a sweep: every folder holding a job's .hydra/ (at any depth, so nesting would show)."""
    return sorted(os.path.dirname(d) for d in glob.glob(os.path.join(str(sweep), "**", ".hydra"), recursive=True))


# ---- without a cluster --------------------------------------------------------------------------------------------

def test_sbatch_hints_name_the_launcher_key():
    gpu = sbatch_hint("sbatch: error: Invalid generic resource (gres) specification", {"gpus_per_node": 1})
    assert "hydra.launcher.gpus_per_node=1" in gpu and "hydra.launcher.gpus_per_node=0" in gpu
    assert "hydra/launcher=slurm_cpu" in gpu and "\n" not in gpu
    mem = sbatch_hint("sbatch: error: Memory specification can not be satisfied\nsbatch: error: Batch job submission "
                      "failed: Requested node configuration is not available", {"mem_gb": 64, "cpus_per_task": 8})
    assert "with hydra.launcher.mem_gb=64:" in mem and "cpus_per_task" not in mem and "\n" not in mem
    assert "hydra.launcher.cpus_per_task" in sbatch_hint("sbatch: error: Batch job submission failed: More processors "
                                                         "requested than permitted", {"cpus_per_task": 8})
    assert "hydra.launcher.partition=gpu" in sbatch_hint("sbatch: error: invalid partition specified: gpu",
                                                         {"partition": "gpu"})
    assert "hydra.launcher.* keys" in sbatch_hint("sbatch: fatal: something new")


def test_job_folders_leave_path_keys_out_with_the_local_launcher(tmp_path, data_root):
    """data.root=<a path> stays out of the job folder name, so the folders do not nest along its '/'."""
    proc = multirun(tmp_path / "sweep", *TINY, "method=magnitude_l2", "ratio=0.3", f"data.root={data_root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job,) = job_dirs(tmp_path / "sweep")
    assert os.path.dirname(job) == str(tmp_path / "sweep") and "data.root" not in job
    assert os.path.basename(job) == ("calibration.n_samples=8,dtype=float32,evaluate.ppl.max_windows=2,"
                                     "layer_range=all,method=magnitude_l2,model=tiny_llama_gqa,ratio=0.3")
    assert os.path.isfile(os.path.join(job, "results.json"))


def test_a_sweep_over_a_key_left_out_of_the_folder_names_is_refused(tmp_path):
    proc = multirun(tmp_path / "sweep", *TINY, "data.root=/a,/b")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out and not (tmp_path / "sweep").exists()
    assert "data.root swept, but left out of the job folder names" in out and "hydra.sweep.subdir=" in out
    long = multirun(tmp_path / "sweep", *TINY, *(f"+k{i}={'x' * 20}" for i in range(10)))
    assert long.returncode == 2 and "more than a file name may have (255)" in long.stderr


# ---- through the cluster ------------------------------------------------------------------------------------------

def cluster_problem() -> str | None:
    """Why there is no SLURM cluster to test against, or None."""
    if not shutil.which("sbatch"):
        return "sbatch is not on PATH"
    try:
        r = subprocess.run(["sinfo", "-h", "-p", "cpu", "-o", "%t"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"sinfo does not answer ({e})"
    states = r.stdout.split()
    if r.returncode or not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no node up in a partition 'cpu' (sinfo: {(r.stdout + r.stderr).strip() or 'nothing'})"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = cluster_problem()
    if problem:
        if os.environ.get("LLMSP_REQUIRE_SLURM") == "1":
            pytest.fail(f"a SLURM cluster is required here (LLMSP_REQUIRE_SLURM=1): {problem}; "
                        f"as root, .ci/slurm_up.sh brings one up")
        pytest.skip(f"{problem}: no SLURM cluster (as root, .ci/slurm_up.sh brings one up on this machine)")


def array_id(sweep) -> str:
    (first,) = glob.glob(os.path.join(str(sweep), ".submitit", "*_0"))
    return os.path.basename(first).split("_")[0]


def sacct_states(job_id: str, n: int, timeout: float = 30) -> dict[str, str]:
    """{array task id: state} from the accounting database, once it has all n tasks finished."""
    t0 = time.time()
    while True:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id], capture_output=True,
                             text=True, timeout=30).stdout
        states = dict(line.split("|")[:2] for line in out.split())
        if len(states) >= n and all(s not in ("PENDING", "RUNNING", "REQUEUED") for s in states.values()):
            return states
        if time.time() - t0 > timeout:
            return states
        time.sleep(1)


def test_two_jobs_on_slurm_give_both_results_and_the_table(slurm, tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, *SLURM_CPU, *TINY, "method=wanda_sp,magnitude_l2", "ratio=0.3", f"data.root={data_root}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sacct" not in proc.stdout + proc.stderr  # accounting works: no "Bypassing sacct error" on every poll
    jid = array_id(sweep)
    assert sacct_states(jid, 2) == {f"{jid}_0": "COMPLETED", f"{jid}_1": "COMPLETED"}
    jobs = job_dirs(sweep)
    assert len(jobs) == 2 and all(os.path.dirname(j) == str(sweep) for j in jobs)  # flat: no data.root=.. / shared
    # the table as sweeps/aggregate.py builds it for an experiment with these rows and grid
    exp = OmegaConf.create({
        "table": {"title": "slurm", "rows": [{"key": "method.name", "name": "Method"}],
                  "columns": [{"name": "WikiText2", "path": "ppl.wikitext2", "better": "low"}]},
        "scales": {"slurm": {"sweeps": [{"name": "main", "grid": {"method": ["wanda_sp", "magnitude_l2"]}}]}}})
    points = agg.expected_points("slurm", exp, "slurm")
    found = agg.find_results(str(sweep))
    table = agg.build(exp, points, agg.match(exp.table, points, found))
    assert len(found) == 2 and table.missing == []
    assert sorted(row[0] for row in table.rows) == ["magnitude_l2", "wanda_sp"]
    assert all(isinstance(v[1], float) for v in table.values)


def test_a_failing_job_on_slurm_is_named_and_the_other_keeps_its_results(slurm, tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = multirun(sweep, *SLURM_CPU, *TINY, "method=magnitude_l2", "ratio=0.3,1.5", f"data.root={data_root}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "Traceback" not in out
    summary = proc.stderr[proc.stderr.index("1 of 2 jobs failed"):]
    assert summary.count("overrides:") == 1 and "ratio=1.5" in summary and "outside [0, 1)" in summary
    ok = [j for j in job_dirs(sweep) if os.path.isfile(os.path.join(j, "results.json"))]
    assert len(ok) == 1 and "ratio=0.3" in os.path.basename(ok[0])


def test_sbatch_refusing_a_gpu_is_one_line_naming_the_key(slurm, tmp_path):
    proc = multirun(tmp_path / "sweep", "hydra/launcher=slurm", "hydra.launcher.partition=cpu", *TINY,
                    "method=magnitude_l2,wanda_sp", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stdout + proc.stderr
    ours = [line for line in proc.stderr.splitlines() if line.startswith("sbatch rejected the jobs")]
    assert len(ours) == 1 and "hydra.launcher.gpus_per_node=1:" in ours[0]
    assert "hydra.launcher.gpus_per_node=0" in ours[0] and "hydra/launcher=slurm_cpu" in ours[0]
    mem = multirun(tmp_path / "sweep2", *SLURM_CPU, "hydra.launcher.mem_gb=100000", *TINY, "method=magnitude_l2",
                   timeout=120)
    assert mem.returncode == 2 and "Traceback" not in mem.stdout + mem.stderr
    assert "with hydra.launcher.mem_gb=100000: more memory than a node" in mem.stderr


def test_a_requeued_pg_job_resumes_and_ends_with_the_uninterrupted_mask(slurm, tmp_path, data_root):
    """Two identical PG jobs side by side; the second is requeued twice mid-run: `scontrol requeue` (SIGTERM, which
    submitit ignores, then SIGKILL: as a preemption) and SIGUSR2 (submitit's checkpoint and requeue, as before a
    timeout). Each restart resumes from the job folder's checkpoint; the masks then match."""
    sweep = tmp_path / "sweep"
    pg = ["method=pg", "init=random", "ratio=0.3", "method.n_segments=24", "method.batch_size=4", "method.seq_len=32",
          "method.steps=1000", "method.checkpoint_every=25", "method.log_every=100000", "method.plot=false"]
    proc = multirun(sweep, *SLURM_CPU, *TINY, *pg, f"data.root={data_root}", "+run=reference,preempted",
                    "hydra.sweep.subdir=${hydra.job.num}", wait=False)  # the overrides are too long for a folder name
    job, t0 = sweep / "1", time.time()

    def step() -> int:
        try:
            return json.loads((job / "pg_state.json").read_text())["step"]
        except (OSError, ValueError, KeyError):
            return -1

    def restarts() -> int:
        try:
            return (job / "run.log").read_text().count("pg: SLURM job restarted")
        except OSError:
            return 0

    def wait_for(cond, what):
        while not cond():
            if proc.poll() is not None or time.time() - t0 > 480:
                proc.kill()
                out, err = proc.communicate()
                pytest.fail(f"waiting for {what}: sweep {'ended' if proc.returncode else 'timed out'}\n{err[-3000:]}")
            time.sleep(0.1)

    try:
        wait_for(lambda: step() >= 50, "the first checkpoint")
        task = f"{array_id(sweep)}_1"
        subprocess.run(["scontrol", "requeue", task], check=True, timeout=30)
        wait_for(lambda: restarts() == 1, "the restart after scontrol requeue")
        resumed = step()
        wait_for(lambda: step() >= resumed + 50, "two checkpoints after the restart")
        subprocess.run(["scancel", "--signal=USR2", task], check=True, timeout=30)
        wait_for(lambda: restarts() == 2, "the restart after SIGUSR2")
        out, err = proc.communicate(timeout=max(10, 480 - (time.time() - t0)))
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", array_id(sweep)], timeout=30)
    assert proc.returncode == 0, err[-3000:]
    log = (job / "run.log").read_text()
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log  # submitit's checkpoint path
    assert log.count("pg: resumed from") == 2 and "at step 0/" not in log
    ref = json.loads((sweep / "0" / "results.json").read_text())["method_extras"]["pg"]
    res = json.loads((job / "results.json").read_text())["method_extras"]["pg"]
    assert ref["steps_this_run"] == 1000 and 0 < res["steps_this_run"] < 1000  # the last start resumed partway
    assert json.loads((job / "kept_units.json").read_text()) == json.loads((sweep / "0" / "kept_units.json").read_text())
