"""The Hydra configs (config groups as folders of YAML files), installed as llmsp.conf."""
