"""Models: loading diffusers pipelines (Hub or local, the embedded tiny models), LoRA
files in the diffusers format, checkpoint folders, and Hub file downloads."""
