"""Generated from protos/inference/ by tools/gen_protos.py. DO NOT EDIT."""
