"""The files every command writes and reads: records written whole (`atomic`), JSON text, resumable JSONL, the
outputs a command owns and their locks (`outputs`), files inside PyPI packages, the export record, and requests
written to the kernel's control files (`controls`)."""
