"""Output buffers for the launchers: poisoned (NaN / -1) on the CPU, where the tests run the
interpreter, so a row a kernel failed to write cannot pass; plain empty on the GPU, where a fill
would cost one more launch per decode step."""
import torch


def outputs(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.full((n,), -1 if not dtype.is_floating_point else float("nan"), dtype=dtype, device=device)
    return torch.empty(n, dtype=dtype, device=device)
