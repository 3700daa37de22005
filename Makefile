# Two commands: `make demo` and `make test`. Everything they need is installed here.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build of PyTorch by default; on a GPU machine: make demo TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH ?= torch==2.13.0
DEMO ?= demo
DEMO_CASES ?= 800
DEMO_EPOCHS ?= 12
# The demo's backbone: ResNet-18 at a quarter width keeps a 2-core CPU run within minutes.
DEMO_MODEL ?= --backbone resnet18 --backbone_kwargs "{'widen_factor': 0.25}" --max_epochs $(DEMO_EPOCHS)
BUNDLE_RUN := $(BIN)/python -m monai.bundle run --meta_file configs/metadata.json --logging_file configs/logging.conf

.PHONY: install install-test demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e .
	touch $@

install: $(VENV)/.installed

# dciodvfy (dicom3tools) checks every DICOM file the tests write; Orthanc with its DICOMweb plugin
# is the real PACS the PACS tests start on loopback ports.
APT_TEST_PACKAGES := dicom3tools orthanc orthanc-dicomweb
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install -q -e ".[test]"
	{ command -v dciodvfy && test -x /usr/sbin/Orthanc && test -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so; } >/dev/null \
		|| { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(APT_TEST_PACKAGES); } \
		|| echo "could not install $(APT_TEST_PACKAGES): the DICOM validation and PACS tests will say so and skip"
	touch $@

install-test: $(VENV)/.installed-test

demo: install
	$(BIN)/python scripts/make_synthetic_dataset.py --out $(DEMO)/data --n $(DEMO_CASES) --seed 0
	for head in softcam linear; do \
		$(BUNDLE_RUN) --config_file configs/train.json --dataset_dir $(DEMO)/data --output_dir $(DEMO)/eval \
			--ckpt_dir $(DEMO)/models/$$head --head $$head $(DEMO_MODEL) || exit 1; \
		$(BUNDLE_RUN) --config_file "['configs/train.json','configs/evaluate.json']" --dataset_dir $(DEMO)/data \
			--output_dir $(DEMO)/eval --ckpt_dir $(DEMO)/models/$$head --head $$head $(DEMO_MODEL) || exit 1; \
	done
	$(BUNDLE_RUN) --config_file configs/inference.json --input_dir $(DEMO)/data/images --output_dir $(DEMO)/inference \
		--ckpt_path $(DEMO)/models/softcam/model.pt --tracking_uri sqlite:///$(abspath $(DEMO))/eval/mlflow.db $(DEMO_MODEL)
	$(BIN)/python scripts/demo_summary.py --demo $(DEMO) --output_dir $(DEMO)/eval

test: install-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(DEMO) eval
