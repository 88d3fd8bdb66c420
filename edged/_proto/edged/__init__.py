"""Generated from protos/edged/ by tools/gen_protos.py. DO NOT EDIT."""
