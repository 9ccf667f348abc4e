#!/usr/bin/env bash
# A one-node SLURM on this machine, to run the workflow through workflow/profiles/slurm with
# snakemake-executor-plugin-slurm, as on a cluster: every job is an sbatch job, placed in the
# profile's partitions ("cpu" and "gpu", both on this one node) with the profile's runtimes,
# memory and CPUs, and polled by the plugin.
#
#   workflow/scripts/slurm_local.sh                  # the default run (below)
#   workflow/scripts/slurm_local.sh -- sinfo         # any command while the cluster is up
#
# Run as root from the project's venv (`. .venv/bin/activate`), on Debian or Ubuntu. It installs
# what is missing (apt: slurmctld, slurmd, slurm-client, munge; pip: the `slurm` extra of
# pyproject.toml), starts munged, slurmctld and slurmd as root daemons, waits for the node to be
# idle, runs the command, and stops the daemons when it exits (also on an error or Ctrl-C).
# Everything it writes is in one scratch folder, $TOKENCACHE_SLURM_DIR (default
# /tmp/tokencache-slurm: slurm.conf, munge key and socket, daemon state, pid files and logs,
# jobcomp.txt with one line per finished job, jobs.txt with squeue's last listing, slurm_logs/
# with each job's log), and, for the default run, results/$SLURM_LOCAL_NAME/ (default
# slurm-<config name>); in /etc only the link /etc/slurm/slurm.conf to the scratch folder's,
# while the cluster is up (it refuses to start if a SLURM is configured there). Running it again
# starts from a fresh cluster.
#
# The default run: one backbone, one sampler and three methods (`full`, FORA and one with a
# calibration made by the workflow, L2C where the config has it) of config/rehearsal.yaml (the
# paper config on a CPU with stand-in weights: DiT-XL/2, DDIM-50, full, fora3, l2c), or of
# config/smoke.yaml where that file does not exist, in two sampling shards per run: the downloads
# (local rules, from the rehearsal's mirror on 127.0.0.1), the calibration, the shards, their
# merge, the evaluations, the tables, the plots and the report. SLURM_LOCAL_CONFIG,
# SLURM_LOCAL_BACKBONE, SLURM_LOCAL_SAMPLER and SLURM_LOCAL_METHODS (labels, comma-separated)
# choose another subset.
#
# What differs from a GPU cluster: no GPU is requested. That is not set here: the rules request
# GPUs (`gpu=1`, which the plugin turns into --gpus=1) only when the config says `device: cuda`,
# and the configs run here say `device: cpu`. The node is declared with at least the CPUs and
# memory of the profile's largest request (SlurmdParameters=config_overrides), so that SLURM
# accepts every request as a cluster would; what runs is set by the config (`threads: 1` per
# job). One cluster at a time per machine (SLURM's ports 6817 and 6818).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (slurmctld, slurmd and munged run as root here): sudo -E $0"
command -v snakemake >/dev/null && command -v tokencache >/dev/null \
  || die "snakemake or tokencache not on PATH: activate the project's venv first (. .venv/bin/activate)"
PYTHON=$(command -v python)

# --- what is missing: Debian's SLURM and MUNGE, the executor plugin ------------------------------
missing=()
for exe in slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client munged:munge; do
  command -v "${exe%%:*}" >/dev/null || missing+=("${exe#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM (slurmctld, slurmd, client) and MUNGE"
  echo "slurm_local.sh: installing ${missing[*]} (apt-get)" >&2
  apt-get update -qq || die "apt-get update failed: check the network or the apt sources"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed"
fi
if ! "$PYTHON" -c "import snakemake_executor_plugin_slurm" 2>/dev/null; then
  spec=$("$PYTHON" -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['slurm'])")
  echo "slurm_local.sh: installing $spec (pip)" >&2
  "$PYTHON" -m pip install --quiet $spec || die "pip install $spec failed: pip install -e '.[slurm]'"
fi

# --- the scratch folder: a fresh cluster every time ---------------------------------------------
S=${TOKENCACHE_SLURM_DIR:-${TMPDIR:-/tmp}/tokencache-slurm}
mkdir -p "$S" && S=$(cd "$S" && pwd)

pid_of() {  # pid_of FILE NAME: the pid in FILE if that process is alive and is NAME
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ] && echo "$pid"
}

alive() {  # alive PID: running (a zombie, which waits for its parent to reap it, is not)
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

stop_pid() {  # stop_pid PID: SIGTERM, up to 20 s, then SIGKILL
  local pid=$1 i
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do alive "$pid" || return 0; sleep 0.2; done
  echo "slurm_local.sh: pid $pid did not stop in 20 s; killing it" >&2
  kill -9 "$pid" 2>/dev/null || true
}

stop_daemons() {  # the daemons of this scratch folder, from their pid files (an earlier run's too)
  local pid
  pid=$(pid_of "$S/slurmd.pid" slurmd) && stop_pid "$pid"
  pid=$(pid_of "$S/slurmctld.pid" slurmctld) && stop_pid "$pid"
  pid=$(pid_of "$S/munge/munged.pid" munged) && stop_pid "$pid"
  return 0
}

stepds() { local p; for p in /proc/[0-9]*; do [ "$(readlink "$p/exe" 2>/dev/null)" = /usr/sbin/slurmstepd ] && echo "${p#/proc/}"; done; return 0; }

stop_daemons  # left by an earlier run that was killed with SIGKILL
rm -rf "$S/state" "$S/spool" "$S/log" "$S/munge" "$S/key" "$S/slurm_logs" "$S/jobcomp.txt" "$S/slurm.conf"
mkdir -p "$S/state" "$S/spool" "$S/log" "$S/slurm_logs"
mkdir -m 755 "$S/munge"
mkdir -m 700 "$S/key"
head -c 1024 /dev/urandom > "$S/key/munge.key" && chmod 400 "$S/key/munge.key"

for port in 6817 6818; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    die "port $port is in use (another SLURM on this machine?): stop it first"
  fi
done

# --- slurm.conf: one node, partitions cpu and gpu, no cgroups, no accounting database -----------
NODE=$(hostname -s)
read -r REAL_CPUS REAL_MEM < <(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\) .* RealMemory=\([0-9]*\).*/\1 \2/p')
[ -n "$REAL_CPUS" ] || die "slurmd -C printed no CPUs and RealMemory"
# the profile's largest request (cpus_per_task, mem_mb) must fit on the node, as on a cluster
read -r PROFILE_CPUS PROFILE_MEM < <("$PYTHON" - <<'EOF'
import yaml
p = yaml.safe_load(open("workflow/profiles/slurm/config.yaml"))
res = [p.get("default-resources", {}), *p.get("set-resources", {}).values()]
print(max(int(r.get("cpus_per_task", 1)) for r in res), max(int(r.get("mem_mb", 0)) for r in res))
EOF
)
CPUS=$(( REAL_CPUS > PROFILE_CPUS ? REAL_CPUS : PROFILE_CPUS ))
MEM=$(( REAL_MEM > PROFILE_MEM ? REAL_MEM : PROFILE_MEM ))
# /etc/slurm/slurm.conf, a link to the scratch folder's, removed at exit: the plugin's job step
# drops SLURM_CONF from the environment of the srun inside each job, so only the default path works
ETC_CONF=/etc/slurm/slurm.conf
if [ -e "$ETC_CONF" ] || [ -L "$ETC_CONF" ]; then
  [ "$(readlink "$ETC_CONF")" = "$S/slurm.conf" ] || die "$ETC_CONF exists (a SLURM is configured on this machine): use that one, or move it away"
fi
cat > "$S/slurm.conf" <<EOF
# written by workflow/scripts/slurm_local.sh: one node ($NODE: $REAL_CPUS CPUs and $REAL_MEM MB
# really, declared with $CPUS and $MEM so that the profile's requests fit), no GPUs
ClusterName=tokencache-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$S/munge/munge.socket
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
MailProg=/bin/true
# no cgroups (a container may have none usable): processes tracked by parent pid, no binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SwitchType=switch/none
# no slurmdbd: sacct does not work, so the plugin polls with squeue (--slurm-status-command
# squeue), which shows finished jobs for MinJobAge seconds; jobcomp.txt keeps a line per job
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$S/jobcomp.txt
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF

# --- start, and stop on exit ---------------------------------------------------------------------
STEPDS_BEFORE=" $(stepds | tr '\n' ' ') "
cleanup() {
  local rc=$? ids pid i
  trap - EXIT INT TERM
  if pid_of "$S/slurmctld.pid" slurmctld >/dev/null; then
    squeue --states=all --format='%i|%T|%P|%C|%m|%b|%j|%k' > "$S/jobs.txt" 2>/dev/null || true
    ids=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$ids" ]; then
      scancel $ids 2>/dev/null || true
      for i in $(seq 60); do [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break; sleep 0.5; done
    fi
  fi
  stop_daemons
  [ "$(readlink "$ETC_CONF" 2>/dev/null)" = "$S/slurm.conf" ] && rm -f "$ETC_CONF"
  for pid in $(stepds); do  # job steps that outlived their slurmd: only those started by this run
    case $STEPDS_BEFORE in *" $pid "*) ;; *) stop_pid "$pid" ;; esac
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
mkdir -p /etc/slurm && ln -sfn "$S/slurm.conf" "$ETC_CONF"

tail_logs() { tail -n 5 "$S"/log/*.log >&2 2>/dev/null || true; }
# --force: munged wants a socket that every user can reach; here only root uses it (jobs run as root),
# and the scratch folder may be private (pytest's are)
munged --force --key-file="$S/key/munge.key" --socket="$S/munge/munge.socket" --pid-file="$S/munge/munged.pid" \
  --log-file="$S/log/munged.log" --seed-file="$S/key/munged.seed" || { tail_logs; die "munged did not start (log above)"; }
slurmctld || { tail_logs; die "slurmctld did not start (log above)"; }
slurmd || { tail_logs; die "slurmd did not start (log above)"; }
state=
for i in $(seq 120); do
  state=$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1) || true
  [ "$state" = idle ] && break
  sleep 0.5
done
[ "$state" = idle ] || { tail_logs; die "node $NODE is '${state:-unknown}', not idle, after 60 s (logs above, in $S/log)"; }
echo "slurm_local.sh: SLURM is up (node $NODE, partitions cpu and gpu; $ETC_CONF → $S/slurm.conf)" >&2

# --- the command ---------------------------------------------------------------------------------
if [ "${1:-}" = "--" ]; then
  shift
  "$@"
  exit $?
fi
[ $# -eq 0 ] || die "unknown argument $1: run with no argument, or -- COMMAND"

CONFIG=${SLURM_LOCAL_CONFIG:-$( [ -f config/rehearsal.yaml ] && echo config/rehearsal.yaml || echo config/smoke.yaml )}
NAME=${SLURM_LOCAL_NAME:-slurm-$(basename "$CONFIG" .yaml)}
# the subset of CONFIG, as a config file in the scratch folder (`--config` merges nested keys, so
# it cannot drop backbones or methods)
NAME="$NAME" CONFIG="$CONFIG" OUT="$S/config.yaml" "$PYTHON" - <<'EOF'
import os
import sys

import yaml

def fail(msg):
    sys.exit(f"slurm_local.sh: {msg}")

def merge(base, top):  # workflow/rules/common.smk's merge_config: `top` over `base`, key by key
    return {**base, **{k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in top.items()}}

def load(path):  # a config, its `overlay_of:` (relative to it) merged under it
    cfg = yaml.safe_load(open(path))
    base = cfg.pop("overlay_of", None)
    return merge(load(os.path.join(os.path.dirname(path), base)), cfg) if base else cfg

path = os.environ["CONFIG"]
cfg = load(path)
methods = cfg["methods"]

def calibrated(label):  # a method whose calibration the workflow makes (`FILE=auto`)
    spec = methods[label]
    return "=auto" in spec["method"] or "auto" in spec.get("params", {}).values()

def runs_on(label, backbone, sampler):
    spec = methods[label]
    return backbone in spec.get("models", cfg["backbones"]) and sampler in spec.get("samplers", cfg["samplers"])

backbone = os.environ.get("SLURM_LOCAL_BACKBONE") or next(iter(cfg["backbones"]))
if backbone not in cfg["backbones"]:
    fail(f"SLURM_LOCAL_BACKBONE={backbone} is not a backbone of {path} ({', '.join(cfg['backbones'])})")
# the method with a calibration: L2C's router if the config has it, else the first such method
runnable = [m for m in methods if calibrated(m) and any(runs_on(m, backbone, s) for s in cfg["samplers"])]
cal = next((m for m in runnable if methods[m]["method"].split(":")[0] == "l2c"), runnable[0] if runnable else None)
sampler = os.environ.get("SLURM_LOCAL_SAMPLER") or next(
    (s for s in cfg["samplers"] if cal and runs_on(cal, backbone, s)), next(iter(cfg["samplers"])))
if sampler not in cfg["samplers"]:
    fail(f"SLURM_LOCAL_SAMPLER={sampler} is not a sampler of {path} ({', '.join(cfg['samplers'])})")
if os.environ.get("SLURM_LOCAL_METHODS"):
    labels = os.environ["SLURM_LOCAL_METHODS"].split(",")
else:  # full, the first FORA, the method with a calibration
    fora = next((m for m in methods if methods[m]["method"].split(":")[0] == "fora" and runs_on(m, backbone, sampler)), None)
    labels = [m for m in ("full", fora, cal) if m]
for label in labels:
    if label not in methods or not runs_on(label, backbone, sampler):
        fail(f"SLURM_LOCAL_METHODS: {label} is not a method of {path} that runs {backbone} with {sampler}")
cfg["name"] = os.environ["NAME"]
cfg["backbones"] = {backbone: cfg["backbones"][backbone]}
cfg["samplers"] = {sampler: cfg["samplers"][sampler]}
cfg["methods"] = {m: {k: v for k, v in methods[m].items() if k not in ("models", "samplers")} for m in labels}
cfg["ablation"] = [m for m in cfg.get("ablation", []) if m in labels]
cfg.pop("tuning", None)  # left out: fifteen more sbatch jobs of the same kind as these (its rules have profile entries)
if str(cfg.get("downloads", "")).startswith("results/"):  # a config's own stand-ins: this run's own copy
    cfg["downloads"] = f"results/{cfg['name']}/downloads"
if cfg["shard_size"] >= cfg["num_samples"]:  # two shards per run, so that the merge merges
    cfg["shard_size"] = max(1, -(-cfg["num_samples"] // 2))
yaml.safe_dump(cfg, open(os.environ["OUT"], "w"), sort_keys=False)
print(f"slurm_local.sh: {path} with {backbone}, {sampler}, {', '.join(labels)} only "
      f"({cfg['num_samples']} samples in shards of {cfg['shard_size']}): {os.environ['OUT']}", file=sys.stderr)
EOF

cmd=(snakemake --profile workflow/profiles/slurm --configfile "$S/config.yaml"
  --slurm-status-command squeue --slurm-init-seconds-before-status-checks 2
  --slurm-logdir "$S/slurm_logs" --slurm-keep-successful-logs)
echo "slurm_local.sh: ${cmd[*]}" >&2
"${cmd[@]}"
