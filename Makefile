# SegResMamba benchmark suite. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# pinned CPU build for machines without a GPU (the CPU index serves "+cpu" wheels; a plain PyPI torch is a multi-GB CUDA build)
TORCH_CPU ?= torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install test test-slow test-gpu doctor fit-demo bench-brats bench-btcv bench-spleen bench-efficiency bench-scan scan-ablation kernel-report model-step step-profile layout-audit graph-memory tom-host perf-targets measure-targets triton-ab ddp-check gpu-hours params plots clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	@# keep a torch that is already there (a user's CUDA build is seen through --system-site-packages)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "using installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "GPU found: installing torch from PyPI (CUDA build)"; $(PY) -m pip install --no-cache-dir torch; \
	else \
		echo "no GPU: installing $(TORCH_CPU) (CPU build)"; \
		$(PY) -m pip install --no-cache-dir --retries 1 "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); \
	fi
	@# no wheel cache: a fresh environment gains nothing from it, and it fills small disks
	$(PY) -m pip install --no-cache-dir -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the suite (CPU torch without a GPU, keeps an existing torch)

# the Triton kernels' tests through Triton's interpreter (TRITON_INTERPRET=1; on a CPU)
INTERPRETED := tests/test_scan_triton.py tests/test_group_norm.py tests/test_upsample.py

# the suite's largest file (child processes: fits, sweeps, the DDP check), run in the second process below
ALONGSIDE := tests/test_benchmarks.py

# $(call suite,MARKS): the CPU tests in two processes at once, each mostly one core's Python or child processes:
# the suite but $(ALONGSIDE), and the Triton kernels through Triton's interpreter followed by $(ALONGSIDE), whose
# report follows the first's; fails if either fails. One OpenMP thread each (unless set): the tests' tensors are
# small, and two processes' spinning thread pools on the same cores cost more than they give
define suite
	@export OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=$${MKL_NUM_THREADS:-1}; log=$$(mktemp); \
	( rc=0; if $(PY) -c "import triton" 2>/dev/null; then TRITON_INTERPRET=1 $(PY) -m pytest -q $(1) $(INTERPRETED) -k interpreter || rc=1; \
	  else echo "triton not installed: the kernel tests under its interpreter are skipped"; fi; \
	  $(PY) -m pytest -q $(1) $(ALONGSIDE) || rc=1; exit $$rc ) > $$log 2>&1 & second=$$!; \
	$(PY) -m pytest -q $(1) --ignore=$(ALONGSIDE); first=$$?; \
	wait $$second; other=$$?; echo "--- the Triton kernels through Triton's interpreter, then $(ALONGSIDE):"; cat $$log; \
	rm -f $$log; [ $$first -eq 0 ] && [ $$other -eq 0 ]
endef

test: $(STAMP) ## run the fast test suite (CPU, a few minutes), the Triton kernels through Triton's interpreter alongside
	$(call suite,)

test-slow: $(STAMP) ## run the slow CPU tests too (long-sequence scan, longer fits, the larger interpreter cases)
	$(call suite,-m "slow or not slow")

test-gpu: $(STAMP) ## run the CUDA tests (needs a GPU)
	$(PY) -m pytest -q -m gpu

doctor: $(STAMP) ## print torch/CUDA/GPU/scan-backend facts
	$(VENV)/bin/segresmamba doctor

fit-demo: $(STAMP) ## fit + test SegResMamba for a few steps on the in-memory synthetic data
	$(VENV)/bin/segresmamba fit -c configs/trainer/cpu.yaml -c configs/model/segresmamba.yaml -c configs/data/synthetic.yaml --trainer.max_epochs 2 --trainer.logger.init_args.name demo
	$(VENV)/bin/segresmamba test -c configs/trainer/cpu.yaml -c configs/model/segresmamba.yaml -c configs/data/synthetic.yaml --trainer.logger.init_args.name demo --ckpt_path "$$(ls -t runs/demo/version_*/checkpoints/last.ckpt | head -1)"

PROFILE ?= quick
RECIPE ?=
# bench-<dataset>: PROFILE=quick runs every model for a few steps on synthetic phantoms of THAT dataset's
# layout, read by its own adapter (CPU, minutes; configs/bench/<dataset>_quick.yaml); PROFILE=paper runs the
# paper protocol (configs/bench/<dataset>.yaml) on real data named by BRATS_DIR / BTCV_DIR / SPLEEN_DIR (GPU).
# RECIPE=nnunet (or "paper nnunet") replaces the sweep's recipes; results land in <out>/<recipe>/<model>/fold<k>.
define bench
	@case "$(PROFILE)" in \
	quick) sweep=configs/bench/$(1)_quick.yaml; out=results/quick/$(1); root="" ;; \
	paper) test -n "$(2)" || { echo "error: PROFILE=paper needs $(3)=/path/to/the/dataset" >&2; exit 2; }; \
		sweep=configs/bench/$(1).yaml; out=results/$(1); root="--data-root $(2)" ;; \
	*) echo "error: PROFILE must be quick or paper, got $(PROFILE)" >&2; exit 2 ;; \
	esac; \
	$(PY) -m segresmamba.bench.sweep $$sweep $$root $(if $(strip $(RECIPE)),--recipes $(RECIPE)) && $(PY) -m segresmamba.bench.aggregate $$out
endef

bench-brats: $(STAMP) ## the main job: quick synthetic BraTS sweep of all models (PROFILE=paper BRATS_DIR=... [RECIPE=nnunet] for the paper protocol)
	$(call bench,brats,$(BRATS_DIR),BRATS_DIR)

bench-btcv: $(STAMP) ## BTCV sweep: quick on synthetic BTCV-layout phantoms (PROFILE=paper BTCV_DIR=... [RECIPE=nnunet])
	$(call bench,btcv,$(BTCV_DIR),BTCV_DIR)

bench-spleen: $(STAMP) ## MSD Spleen sweep: quick on synthetic Decathlon-layout phantoms (PROFILE=paper SPLEEN_DIR=... [RECIPE=nnunet])
	$(call bench,spleen,$(SPLEEN_DIR),SPLEEN_DIR)

bench-robustness: $(STAMP) ## train on the MNI152 template, test on acquisition-shifted copies of its held-out slab (PROFILE=quick: CPU; gpu) -> results/robustness/<card>/
	$(PY) -m segresmamba.bench.robustness configs/bench/robustness_$(PROFILE).yaml

bench-efficiency: $(STAMP) ## params, MACs, memory and the suite's training step of every model at the paper configs -> results/efficiency/<device>/
	$(PY) -m segresmamba.bench.efficiency $(EFFICIENCY_ARGS)

bench-scan: $(STAMP) ## scan backends on the ToM layer and the scan alone, tuned, with a kernel profile (GPU) -> results/perf/
	$(PY) -m perf.scan_bench --tune --profile --out results/perf

scan-ablation: $(STAMP) ## the scan backward with parts cut out: timed on the GPU, or compiled for sm_90 with STATIC=1 (CPU) -> results/perf/
	$(PY) -m perf.scan_ablation --out results/perf $(if $(STATIC),--static)

kernel-report: $(STAMP) ## registers, spills and hot-loop instructions of the scan kernels, compiled for sm_90 on this CPU -> results/perf/
	$(PY) -m perf.kernel_resources --out results/perf

model-step: $(STAMP) ## whole-model training step on this GPU in nine modes: eager, ToM graphs, whole-step graphs, fast norms, channels_last, fast GroupNorm, whole-step graphs with channels_last and fast norms (BraTS 128^3) -> results/perf/
	$(PY) -m perf.model_step --measure --out results/perf

# the step's variant for step-profile, layout-audit and graph-memory: FAST_NORMS=1 (or group), CHANNELS_LAST=1
STEP_VARIANT = $(if $(filter group,$(FAST_NORMS)),--fast-norms group,$(if $(FAST_NORMS),--fast-norms)) $(if $(CHANNELS_LAST),--channels-last)

step-profile: $(STAMP) ## GPU kernel time (by kind) against wall time of a training step (MODEL=segresmamba): eager, ToM graphs, whole-step graphs (FAST_NORMS=1: with fast_norms; FAST_NORMS=group: GroupNorm only; CHANNELS_LAST=1: NDHWC) -> results/perf/
	$(PY) -m perf.step_profile --model $(or $(MODEL),segresmamba) --config brats --out results/perf $(STEP_VARIANT)

layout-audit: $(STAMP) ## ops of one training step that mix NCDHW and NDHWC maps or read strided ones, ranked, with where they ran (MODEL=segresmamba; FAST_NORMS=1, CHANNELS_LAST=1 as step-profile; on the GPU for the GPU's paths) -> results/perf/
	$(PY) -m perf.layout_audit --model $(or $(MODEL),segresmamba) --config brats --out results/perf $(STEP_VARIANT)

graph-memory: $(STAMP) ## the whole-step CUDA graphs' memory pool against the tensors alive in it, and what is alive at its peak (GPU; MODEL=segresmamba; FAST_NORMS=1, CHANNELS_LAST=1 as step-profile) -> results/perf/
	$(PY) -m perf.graph_memory --model $(or $(MODEL),segresmamba) --config brats --out results/perf $(STEP_VARIANT)

perf-targets: $(STAMP) ## the training step's speed targets against the figures of model_step.csv and scan.csv, each pair from one run -> results/perf/targets.md
	$(PY) -m perf.targets --out results/perf

measure-targets: $(STAMP) ## on this GPU, in one run: the figures the speed targets need (model_step of segresmamba, nnunet and segmamba eager, eager_gn and the two fastest candidates; the ToM layer against mamba_ssm), then perf-targets -> results/perf/
	$(PY) -m perf.model_step --measure --models segresmamba nnunet segmamba --modes eager eager_gn step_fn step_cl_fn --out results/perf
	$(PY) -m perf.model_step --table $$(ls results/perf/model_step_source/*/*/brats.csv) --out results/perf
	$(PY) -m perf.scan_bench --kinds tom --quick --backends triton,mamba_ssm --out results/perf
	$(PY) -m perf.targets --out results/perf

tom-host: $(STAMP) ## host work of one fused ToM layer (Python, dispatcher, autograd), its Triton launches counted, not run (CPU) -> results/perf/tom_host.md
	$(PY) -m perf.tom_host --out results/perf

triton-ab: $(STAMP) ## the ToM layer's kernels built by this machine's Triton (CPU; AB=dir) timed against the GPU's own (on the GPU: RUN=1) -> results/perf/triton_ab.md
	$(if $(RUN),$(PY) -m perf.triton_ab run --cubins $(or $(AB),.triton_ab) --out results/perf,$(PY) -m perf.triton_ab build --out $(or $(AB),.triton_ab))

ddp-check: $(STAMP) ## DDP on 2 GPUs vs 1 GPU (2 seeds), same fold of the phantoms -> results/ddp/<card>/
	test -f data/phantoms/brats/PHANTOM.json || $(PY) -m segresmamba.data.write_phantoms brats --out data/phantoms/brats --cases 10 --size 64 --seed 0
	$(PY) -m perf.ddp_check --devices 2 --epochs 20

gpu-hours: $(STAMP) ## GPU hours of the paper protocol from measured step times (EFFICIENCY=results/efficiency/nvidia-h200)
	$(PY) -m segresmamba.bench.gpu_hours $(or $(EFFICIENCY),results/efficiency/nvidia-h200)

params: $(STAMP) ## parameter table of every model -> results/params.md
	$(PY) -m segresmamba.bench.params_table

plots: $(STAMP) ## tables and plots of a sweep (RESULTS=results/quick/brats)
	$(PY) -m segresmamba.bench.aggregate $(or $(RESULTS),results/quick/brats)

clean: ## remove runs and caches (keeps .venv and results/)
	rm -rf runs lightning_logs .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
