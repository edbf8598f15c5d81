"""Language-model LoRA (task_type: text-generation): data formats, causal-LM loading, the loop, export, generate."""
