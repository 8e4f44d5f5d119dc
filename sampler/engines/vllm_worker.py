"""Runs inside vLLM's worker process: loads pushed weights into the live model in place.

Named through `worker_extension_cls`, so vLLM mixes this class into its worker; the engine calls
the methods with `collective_rpc`. Arguments cross a process boundary by serialisation, and
tensors do not survive it (they arrive as nested lists), so weights travel as safetensors bytes or
as a path. Method names carry an `opd_` prefix because a name that clashes with the worker's own
(`reload_weights`, `update_weights`) is refused at worker start.
"""

from typing import Any

from sampler.wire import decode, decode_file


class OpdWeightLoader:
    model_runner: Any  # provided by the vLLM worker this class is mixed into

    def opd_load_safetensors_bytes(self, payload: bytes) -> int:
        return self._opd_reload(decode(payload)[0])  # views into the payload: no second copy

    def opd_load_safetensors_file(self, path: str) -> int:
        return self._opd_reload(decode_file(path)[0])

    def _opd_reload(self, tensors: dict) -> int:
        # vLLM's in-place reload maps HF checkpoint names onto its fused layers (qkv, gate_up).
        self.model_runner.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        self._opd_refresh_lm_head()
        return len(tensors)

    def _opd_refresh_lm_head(self) -> None:
        """Re-run the LM head's post-load processing.

        On the CPU build the LM head projects through a packed oneDNN copy of its weight made
        after loading. With tied embeddings the reload gives the head no tensor of its own, so it
        would keep projecting with the OLD embedding. Re-packing is exact and, for untied heads
        and on GPU, a harmless repeat of what the reload already did.
        """
        lm_head = getattr(self.model_runner.get_model(), "lm_head", None)
        method = getattr(lm_head, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(lm_head)
