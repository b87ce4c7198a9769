# abcd-edge — two commands on a fresh machine: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/abcd-edge
STAMP := $(VENV)/.installed

.PHONY: install run test export profile calibrate calibrate-ays bench bench-runtime bench-schedules demo-model demo-latent featurenet evalnet evaluate-demo clean
.PHONY: featurenet128 evalnet128 demo-latent-lcm export-latent profile-latent calibrate-latent evaluate-latent bench-latent

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[dev,export]'
	touch $(STAMP)

install: $(STAMP)

## the main job (torch-free runtime): a prompt to the latent demo's consistency twin (export/demo-latent-lcm, its
## committed profile and controller) within 150 ms -> out/run.png + out/run.json. The pixel demo: `make run-pixel`.
EXAMPLE_PROMPT = $(shell cat export/demo-latent-prompts/example.txt)
run: $(STAMP)
	$(CLI) run --prompt "$(EXAMPLE_PROMPT)" --budget 150ms --out out/run.png --report out/run.json

run-pixel: $(STAMP)
	$(CLI) run --budget 150ms --out out/run-pixel.png --report out/run-pixel.json

test: $(STAMP)
	$(PY) -m pytest

## train the shipped demo denoiser (background-friendly, resumable): export/demo-model/
demo-model: $(STAMP)
	$(PY) -m abcd_edge.demo.train --out export/demo-model --steps 6000

## train the latent text-to-image demo (StableDiffusionPipeline layout, resumable; about 1.5 h on 2 cores):
## VAE then text encoder + UNet, checkpoints in export/.demo-latent-work/ -> export/demo-latent-model/
demo-latent: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m abcd_edge.demo.latent.train --stage all --work export/.demo-latent-work --out export/demo-latent-model --vae-steps 2000 --unet-steps 3000 --threads 2

## the quality feature network and its committed reference statistics (generator seed 4321, 2048 images)
featurenet: $(STAMP)
	$(PY) -m abcd_edge.demo.featurenet --out export/featurenet
	$(PY) -m abcd_edge.demo.reference --seed 4321 --n 2048

## the evaluation feature network: another seed and architecture, the judge calibration never optimises against
evalnet: $(STAMP)
	$(PY) -m abcd_edge.demo.featurenet --out export/evalnet --images 30000 --heldout 2000 --steps 2000 --batch 128 --lr 0.002 --threads 1 --seed 1 --widths 24,48,96,192 --depths 1,2,1,1
	$(PY) -m abcd_edge.demo.reference --seed 8765 --n 2048 --featurenet export/evalnet

## the 128x128 feature networks (patchify stem to 32, then the same blocks; ONNX also outputs the heads'
## kinds/colours/count predictions for prompt accuracy): calibration net (seed 0) and evaluation net (another
## seed and architecture), each with its reference statistics at 128 (same reference seeds as the 32px nets)
featurenet128: $(STAMP)
	$(PY) -m abcd_edge.demo.featurenet --out export/featurenet128 --resolution 128 --images 30000 --heldout 2000 --steps 2800 --batch 128 --lr 0.002 --threads 1 --seed 0
	$(PY) -m abcd_edge.demo.reference --seed 4321 --n 2048 --resolution 128 --featurenet export/featurenet128

evalnet128: $(STAMP)
	$(PY) -m abcd_edge.demo.featurenet --out export/evalnet128 --resolution 128 --images 12000 --heldout 2000 --steps 1400 --batch 128 --lr 0.002 --threads 1 --seed 1 --widths 24,48,96,192 --depths 1,2,1,1
	$(PY) -m abcd_edge.demo.reference --seed 8765 --n 2048 --resolution 128 --featurenet export/evalnet128

## its consistency twin: LCM distillation from the base (guidance baked in through timestep_cond; resumable)
demo-latent-lcm: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) -m abcd_edge.demo.latent.distill --base export/demo-latent-model --out export/demo-latent-lcm-model --work export/.demo-latent-work/distill --steps 1200 --images 8000 --threads 2

## the latent demo and its twin as ONNX artifacts (the twin's is committed: the main job; the base's is made here for
## evaluate-latent), this machine's two CPU tiers for the twin, its controller
LATENT_PROMPTS := export/demo-latent-prompts
export-latent: $(STAMP)
	$(CLI) export --model export/demo-latent-model --out export/demo-latent
	$(CLI) export --model export/demo-latent-lcm-model --out export/demo-latent-lcm

profile-latent: $(STAMP)
	$(CLI) profile --artifact export/demo-latent-lcm --threads 2 --runs 200 --out profiles/demo-latent-lcm-cpu-2t.json --force
	$(CLI) profile --artifact export/demo-latent-lcm --threads 1 --runs 200 --out profiles/demo-latent-lcm-cpu-1t.json --force

calibrate-latent: $(STAMP)
	$(CLI) calibrate --artifact export/demo-latent-lcm --profile profiles/demo-latent-lcm-cpu-2t.json --profile profiles/demo-latent-lcm-cpu-1t.json --prompts $(LATENT_PROMPTS)/calibration.txt --search-noises 64

## FID and prompt accuracy vs steps (512 held-out prompts, evaluation net) + prompts x steps grids
evaluate-latent: $(STAMP)
	$(PY) -m abcd_edge.demo.latent.evaluate --artifact export/demo-latent --steps 5,10,20,50 --samples 512 --out export/demo-latent-model
	$(PY) -m abcd_edge.demo.latent.evaluate --artifact export/demo-latent-lcm --steps 1,2,4,6 --samples 512 --out export/demo-latent-lcm-model

## the seed's headline row (consistency 6 steps, 128x128, 150 ms, real CPU tiers; 60 ms where the budget binds)
## and easy vs hard prompts at rho < 1
LATENT_TIERS := profiles/demo-latent-lcm-cpu-2t.json,profiles/demo-latent-lcm-cpu-1t.json
bench-latent: $(STAMP)
	$(CLI) bench --artifact export/demo-latent-lcm --profiles $(LATENT_TIERS) --batch 1 --budgets 60ms,150ms --samplers lcm --max-steps 6 --quality 1 --methods uniform,karras,logsnr,stepdrop,buco-mwg,abcd --seeds 4 --samples 256 --teacher-steps 50 --prompts $(LATENT_PROMPTS)/bench.txt --out bench/latent-headline
	$(CLI) bench --artifact export/demo-latent-lcm --profiles profiles/demo-latent-lcm-cpu-2t.json --batch 1 --budgets 150ms --samplers lcm --max-steps 6 --quality 1,0.6 --methods uniform,abcd --seeds 4 --samples 512 --teacher-steps 50 --prompts easy=$(LATENT_PROMPTS)/easy.txt,hard=$(LATENT_PROMPTS)/hard.txt --out bench/latent-easy-hard

## the evidence that the demo model is real: feature-FID vs steps + sample grid
evaluate-demo: $(STAMP)
	$(PY) -m abcd_edge.demo.evaluate --out export/demo-model

export: $(STAMP)
	$(CLI) export --model demo --out export/demo --bench

## the two real CPU tiers of this machine kind (--force: replaces the committed ones, measured on another machine)
profile: $(STAMP)
	$(CLI) profile --artifact export/demo --backend ort-cpu --threads 2 --batch 1,4 --runs 300 --out profiles/cpu-2t.json --force
	$(CLI) profile --artifact export/demo --backend ort-cpu --threads 1 --batch 1,4 --runs 300 --out profiles/cpu-1t.json --force

## search, fit and gate the controller (keeps calibration/demo/ays.json; SEED=1 for a second run)
SEED ?= 0
CALIBRATION_OUT ?= calibration/demo
calibrate: $(STAMP)
	$(CLI) calibrate --artifact export/demo --profile profiles/cpu-2t.json --profile profiles/cpu-1t.json --samplers ddim,dpmpp-2m,euler --seed $(SEED) --out $(CALIBRATION_OUT)

## the same, also retraining the AYS-like baseline the bench compares with (slow)
calibrate-ays: $(STAMP)
	$(CLI) calibrate --artifact export/demo --profile profiles/cpu-2t.json --profile profiles/cpu-1t.json --samplers ddim,dpmpp-2m,euler --seed $(SEED) --ays --out $(CALIBRATION_OUT)

bench: $(STAMP)
	$(CLI) bench --grid quick --out bench/quick

bench-runtime: $(STAMP)
	$(CLI) bench-runtime --out bench/runtime

## ABCD's placement vs every static one at fixed step counts (1,024 held-out images, evaluation net)
bench-schedules: $(STAMP)
	$(CLI) bench-schedules --samplers ddim --steps 3,5,8,13,20 --samples 1024

clean:
	rm -rf out .pytest_cache
