# The tests, the demo, the bench and the lab run in a virtual environment of
# their own, .venv in the checkout, made with Debian's /usr/bin/python3 (not a
# python3 of one's own build first on PATH): nothing goes into the system's Python.
VENV := .venv
PYTHON := $(VENV)/bin/python3
# What `make clean` removes besides the venv: the demo's lab and the VM image cache.
DEMO_DIR := $(or $(PLANB_DEMO_DIR),/var/tmp/planb-pvesync-demo)
LAB_CACHE := $(or $(PLANB_LAB_CACHE),/var/cache/planb-pvesync-lab)

.PHONY: deps packages test demo bench lab lab-down clean

deps: packages $(VENV)/.installed

# Debian packages the tests and the lab need (as root); a no-op when present.
packages:
	tests/lab/install-deps

$(VENV)/.installed: requirements-test.txt | packages
	/usr/bin/python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements-test.txt
	touch $@

test: deps
	$(PYTHON) -m pytest -v tests

# Boot the lab and show the tool backing up a guest of the demo cluster.
demo: deps
	$(PYTHON) tests/lab/demo.py

# planb-pvesync against syncoid and zfs-autobackup on the lab (prints its estimated time;
# about an hour on 2 cores), in an image of its own that has the peers; writes
# bench/results.rst, results.json and the picture bench/scale.png. See bench/README.rst.
bench: deps
	$(VENV)/bin/pip install -q -r bench/requirements.txt
	$(PYTHON) bench/bench.py

# Boot the VM lab (building its image if needed) and leave it running; prints how to log in.
lab: deps
	$(PYTHON) tests/lab/lab.py up

lab-down:
	$(PYTHON) tests/lab/lab.py down

# Everything the demo and the tests leave: the venv, the demo's lab and the image cache.
clean:
	-[ ! -x $(PYTHON) ] || $(PYTHON) tests/lab/lab.py down --state-dir $(DEMO_DIR)
	rm -rf $(VENV) $(DEMO_DIR) $(LAB_CACHE)
