# Two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch by default; on a GPU machine: make demo TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
DEMO ?= demo
DEMO_CASES ?= 800
# The demo's data (docs/README.md, "The demo's setting"): lesions of twice the default radius
# (11-18 px across at 128 x 128, 1.5-4.8 evidence cells of 8 x 8 px) at half the default contrast,
# so that neither classifier saturates.
DEMO_DATA ?= --lesion-size 2 --lesion-contrast 0.5
DEMO_EPOCHS ?= 10
# The demo's model: ResNet-18 at an eighth of its width with the last stage dilated (output stride
# 8: 16 x 16 evidence maps at 128 x 128) keeps a 2-core CPU run within minutes.
DEMO_MODEL ?= --backbone resnet18 --backbone_kwargs "{'widen_factor': 0.125}" --output_stride 8
# Sparse SoftCAM's lambda1 (per evidence map element; chosen by `make lambda-sweep` on the
# validation split, see docs/README.md), the sigmoid branches' epochs, and how many test images the
# demo's explanation comparison scores (empty: all of them).
DEMO_SPARSE_LAMBDA1 ?= 3e-2
DEMO_BRANCH_EPOCHS ?= 5
DEMO_COMPARE_LIMIT ?= 60
SWEEP_LAMBDA1 ?= 0 1e-2 3e-2 1e-1
# The 3D demo: synthetic CT volumes of 32 x 32 x 24 voxels, lesions 1.25 times the default radius
# (3-5 voxels), ResNet-10 at a quarter width with a 3x3x3 stem and output stride 4 (8 x 8 x 8
# evidence maps, cells of 4 voxels).
DEMO3D ?= demo-3d
DEMO3D_CASES ?= 400
DEMO3D_DATA ?= --dims 3 --size 32 --lesion-size 1.25
DEMO3D_EPOCHS ?= 12
DEMO3D_MODEL ?= --spatial_dims 3 --image_size 32 --batch_size 8 \
	--backbone_kwargs "{'widen_factor': 0.25, 'conv1_t_size': 3}" --output_stride 4
DEMO3D_COMPARE_LIMIT ?= 20
BUNDLE_RUN := $(BIN)/python -m monai.bundle run --meta_file configs/metadata.json --logging_file configs/logging.conf
# Only training takes the model's options: every later step reads them from the checkpoint (model.pt
# describes its network, preprocessing and classes).
ON_DEMO_DATA := --dataset_dir $(DEMO)/data --output_dir $(DEMO)/eval

.PHONY: install install-test demo demo-full demo-3d lambda-sweep bench bench-gpu test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

install: $(VENV)/.installed

# dciodvfy (dicom3tools) checks every DICOM file the tests write; Orthanc with its DICOMweb plugin
# is the real PACS the PACS tests start on loopback ports; headless Chromium (with chromedriver, for
# Selenium) opens MLflow's UI as a reviewer does.
APT_TEST_PACKAGES := dicom3tools orthanc orthanc-dicomweb chromium chromium-driver
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	{ command -v dciodvfy && test -x /usr/sbin/Orthanc && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so \
		&& test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TEST_PACKAGES); } \
		|| echo "could not install $(APT_TEST_PACKAGES): the DICOM validation, PACS and browser tests will say so and skip"
	touch $@

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python scripts/make_synthetic_dataset.py --out $(DEMO)/data --n $(DEMO_CASES) --seed 0 $(DEMO_DATA)
	for head in softcam linear; do \
		$(BUNDLE_RUN) --config_file configs/train.json $(ON_DEMO_DATA) $(DEMO_MODEL) --max_epochs $(DEMO_EPOCHS) \
			--ckpt_dir $(DEMO)/models/$$head --head $$head || exit 1; \
		$(BUNDLE_RUN) --config_file "['configs/train.json','configs/evaluate.json']" $(ON_DEMO_DATA) \
			--ckpt_dir $(DEMO)/models/$$head --head $$head || exit 1; \
	done
	$(BUNDLE_RUN) --config_file configs/train.json $(ON_DEMO_DATA) $(DEMO_MODEL) --max_epochs $(DEMO_EPOCHS) \
		--ckpt_dir $(DEMO)/models/softcam-sparse --head softcam --lambda1 $(DEMO_SPARSE_LAMBDA1) --model_name resnet18-softcam-sparse
	for head in linear softcam; do \
		$(BUNDLE_RUN) --config_file "['configs/train.json','configs/train_sigmoid_branch.json']" $(ON_DEMO_DATA) \
			--max_epochs $(DEMO_BRANCH_EPOCHS) --head $$head --baseline_ckpt $(DEMO)/models/$$head/model.pt \
			--ckpt_dir $(DEMO)/models/$$head-sigmoid-branch || exit 1; \
	done
	$(BUNDLE_RUN) --config_file "['configs/train.json','configs/compare.json']" $(ON_DEMO_DATA) --models_dir $(DEMO)/models \
		--compare_limit "$(or $(DEMO_COMPARE_LIMIT),None)"
	$(BUNDLE_RUN) --config_file configs/inference.json --input_dir $(DEMO)/data/images --output_dir $(DEMO)/inference \
		--ckpt_path $(DEMO)/models/softcam/model.pt --tracking_uri sqlite:///$(abspath $(DEMO))/eval/mlflow.db
	$(BIN)/python scripts/demo_summary.py --demo $(DEMO) --output_dir $(DEMO)/eval

# The longer version of the demo: twice the epochs, and the comparison over the whole test split.
demo-full:
	$(MAKE) demo DEMO=demo-full DEMO_EPOCHS=20 DEMO_BRANCH_EPOCHS=10 DEMO_COMPARE_LIMIT=

# SoftCAM (dense) and the black box on synthetic CT volumes, evaluated on the test split, and the
# explanation comparison in 3D over the rows whose models exist (the others are left out).
# The evaluation names its run after the backbone (the checkpoint gives it everything else).
ON_DEMO3D_DATA := --dataset_dir $(DEMO3D)/data --output_dir $(DEMO3D)/eval --backbone resnet10
demo-3d: install
	$(BIN)/python scripts/make_synthetic_dataset.py --out $(DEMO3D)/data --n $(DEMO3D_CASES) --seed 0 $(DEMO3D_DATA)
	for head in softcam linear; do \
		$(BUNDLE_RUN) --config_file configs/train.json $(ON_DEMO3D_DATA) $(DEMO3D_MODEL) --max_epochs $(DEMO3D_EPOCHS) \
			--ckpt_dir $(DEMO3D)/models/$$head --head $$head || exit 1; \
		$(BUNDLE_RUN) --config_file "['configs/train.json','configs/evaluate.json']" $(ON_DEMO3D_DATA) \
			--ckpt_dir $(DEMO3D)/models/$$head --head $$head || exit 1; \
	done
	$(BUNDLE_RUN) --config_file "['configs/train.json','configs/compare.json']" $(ON_DEMO3D_DATA) --models_dir $(DEMO3D)/models \
		--compare_limit "$(or $(DEMO3D_COMPARE_LIMIT),None)"
	$(BIN)/python scripts/demo_summary.py --demo $(DEMO3D) --output_dir $(DEMO3D)/eval --backbone resnet10

# Sparse SoftCAM's lambda1 against accuracy and localisation precision (the paper's way of choosing
# it) on the demo's annotated validation images: run `make demo` first.
lambda-sweep: install
	$(BIN)/python scripts/lambda_sweep.py --demo $(DEMO) --epochs $(DEMO_EPOCHS) --lambda1 $(SWEEP_LAMBDA1) \
		--demo_sparse_lambda1 $(DEMO_SPARSE_LAMBDA1) -- $(DEMO_MODEL)

# The benchmark (docs/benchmarks.md, every statement computed from the run's figures) with the demo's model.
bench: export BENCH_DEMO_MODEL = $(DEMO_MODEL)
bench: install
	$(BIN)/python scripts/benchmark.py --threads 1 --demo-model="$$BENCH_DEMO_MODEL"

# The GPU targets' run (ResNet-50 224^2 bf16, the bundle's stem and torchvision's) on a CUDA machine: torch's
# CUDA build from TORCH_CUDA_INDEX unless the environment's torch already sees a GPU (where that index cannot
# be reached, install a CUDA torch into $(VENV) by hand, or point VENV at an environment that has one).
TORCH_CUDA_INDEX ?= https://download.pytorch.org/whl/cu128
CUDA_TORCH_CHECK := $(BIN)/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"
bench-gpu: install
	$(CUDA_TORCH_CHECK) 2>/dev/null || { $(BIN)/python -m pip install -q --force-reinstall --no-deps $(TORCH) \
		--index-url $(TORCH_CUDA_INDEX) && $(BIN)/python -m pip install -q $(TORCH) --index-url $(TORCH_CUDA_INDEX); }
	$(CUDA_TORCH_CHECK) || { echo "torch $$($(BIN)/python -c 'import torch; print(torch.__version__)') sees no CUDA device"; exit 1; }
	$(BIN)/python scripts/benchmark.py --gpu-targets --device cuda

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) $(DEMO3D) demo-full eval
