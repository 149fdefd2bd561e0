"""The conformance suite, one module per area: the report groups results by these names (test_dma.py
is the dma area). The harness beside this folder (plugin, CLI, report, probe, fault walker) runs them."""
