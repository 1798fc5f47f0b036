"""The substrate every pruning family uses; imports no family.

* `model`: find the decoder blocks and their prunable layers (``nn.Linear``, GPT-2 ``Conv1D``, fused MoE
  experts), read and write their weights (offloaded ones included).
* `blocks`: record what every block receives, run one block on the compute device, stop early, check
  finiteness.
* `stats`: input statistics hooks (norms, Hessians, expert routing).
* `masks`: scores -> masks (per row, per layer, N:M).
* `calibration`: any calibration source -> token windows.
* `compat`: names that differ between supported transformers releases.
* `memory`: peak memory sampling for reports.
"""
