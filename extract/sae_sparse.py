"""TopK SAE training whose backward touches only the k active latents of each row.

sae-lens's `TopKTrainingSAE` computes one training step with dense [batch, width] tensors: the
encoder, the decoder, their gradients and the auxiliary loss are six to nine dense matmuls, where
all but the encoder's forward multiply by a matrix that is zero outside k of `width` columns.
sae-lens's own sparse option (`use_sparse_activations`) fails in the backward on CPU (`aten::view`
has no SparseCPU kernel, sae-lens 6.54), so this module computes the same step with the k active
latents of each row held as a CSR matrix [batch, width]:

- the encoder's forward stays one dense matmul (every pre-activation is needed for the top k);
- the decoder and the encoder's backward are CSR x dense products (only the active rows and
  columns of W_dec and W_enc are read or written), the latents' gradient a sampled product;
- the auxiliary loss (dead latents reconstructing the residual) reads only the dead columns,
  which is exactly sae-lens's loss: its top-k_aux over the dead latents never picks a living one,
  because k_aux <= the number of dead latents.

The function and its gradients are those of `TopKTrainingSAE` (with `rescale_acts_by_decoder_norm`):
only the order of floating-point sums differs (`tests/test_sae_sparse.py` checks the loss and every
gradient against sae-lens's dense step). The inference SAE that is saved is sae-lens's own.
Speed: `bench/bench_sae_train.py` (README, Benchmarks).
"""

from __future__ import annotations

import warnings

import torch
from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput, TrainStepOutput


class _TopKEncode(torch.autograd.Function):
    """(x, W_enc, b_enc, scale) -> the top-k values of relu((x @ W_enc + b_enc) * scale) and their columns.

    Forward keeps the dense pre-activations only to pick the top k; backward is sparse."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, scale, k):
        pre = torch.addmm(b_enc, x, W_enc)                        # [B, W]
        hidden = pre * scale
        top = hidden.topk(k, dim=-1, sorted=False)
        idx, order = top.indices.sort(dim=-1)                     # ascending columns: a valid CSR row
        chosen = top.values.gather(-1, order)
        values = chosen.relu()
        ctx.save_for_backward(x, W_enc, scale, idx, pre.gather(-1, idx), chosen > 0)
        ctx.mark_non_differentiable(idx, hidden)              # hidden: for the trainer's logs and the aux mask
        return values, idx, hidden

    @staticmethod
    def backward(ctx, grad_values, _grad_idx, _grad_hidden):
        x, W_enc, scale, idx, pre_top, on = ctx.saved_tensors
        g = grad_values * on                                      # d loss / d hidden at the top k
        g_pre = g * scale[idx]                                    # d loss / d pre
        flat = idx.reshape(-1)
        grad_scale = torch.zeros_like(scale).index_add_(0, flat, (g * pre_top).reshape(-1))
        grad_b = torch.zeros_like(scale).index_add_(0, flat, g_pre.reshape(-1))
        active = _csr(g_pre, idx, W_enc.shape[1])
        grad_W = active.t() @ x                                   # [W, d]: only the active columns
        grad_x = active @ W_enc.T.contiguous() if ctx.needs_input_grad[0] else None
        return grad_x, grad_W.T, grad_b, grad_scale, None


class _Decode(torch.autograd.Function):
    """(values [B, k], columns [B, k], rows [W, d]) -> sum_j values[:, j] * rows[columns[:, j]]."""

    @staticmethod
    def forward(ctx, values, idx, rows):
        ctx.save_for_backward(values, idx, rows)
        return _csr(values, idx, rows.shape[0]) @ rows

    @staticmethod
    def backward(ctx, grad_out):
        values, idx, rows = ctx.saved_tensors
        active = _csr(values, idx, rows.shape[0])
        # (grad_out @ rows.T) at the active entries only; with beta 0 the entries' own values are not read
        grad_values = torch.sparse.sampled_addmm(active, grad_out, rows.T, beta=0.0).values().view_as(values)
        grad_rows = active.t() @ grad_out
        return grad_values, None, grad_rows


def _csr(values: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
    """The [B, width] matrix holding values[b, j] at column idx[b, j] (ascending in each row), as CSR."""
    n, k = idx.shape
    crow = torch.arange(0, n * k + 1, k, device=idx.device)
    with warnings.catch_warnings():              # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, idx.reshape(-1), values.reshape(-1), (n, width),
                                       check_invariants=False)


class SparseTopKTrainingSAE(TopKTrainingSAE):
    """`TopKTrainingSAE` whose training step gathers the active latents instead of dense matmuls."""

    def __init__(self, cfg: TopKTrainingSAEConfig, use_error_term: bool = False):
        if not cfg.rescale_acts_by_decoder_norm:
            raise ValueError("the sparse TopK step assumes rescale_acts_by_decoder_norm (sae-lens's default)")
        super().__init__(cfg, use_error_term)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        sae_in = self.process_sae_in(step_input.sae_in)
        norm = self.W_dec.norm(dim=-1)                                          # [W]
        values, idx, hidden = _TopKEncode.apply(sae_in, self.W_enc, self.b_enc, norm, self.cfg.k)
        unit = self.W_dec / norm.unsqueeze(-1)                                  # decoder rows of norm 1
        sae_out = _Decode.apply(values, idx, unit) + self.b_dec
        sae_out = self.run_time_activation_norm_fn_out(sae_out)
        mse_loss = self.mse_loss_fn(sae_out, step_input.sae_in).sum(dim=-1).mean()
        aux = self._aux_loss(step_input, sae_in, sae_out, norm, unit)
        with torch.no_grad():
            feature_acts = torch.zeros_like(hidden).scatter_(-1, idx, values.detach())
        return TrainStepOutput(sae_in=step_input.sae_in, sae_out=sae_out, feature_acts=feature_acts,
                               hidden_pre=hidden, loss=mse_loss + aux,
                               losses={"mse_loss": mse_loss, "auxiliary_reconstruction_loss": aux})

    def _aux_loss(self, step_input: TrainStepInput, sae_in: torch.Tensor, sae_out: torch.Tensor,
                  norm: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
        """sae-lens's TopK auxiliary loss (`calculate_topk_aux_loss`) computed on the dead columns only."""
        mask = step_input.dead_neuron_mask
        if mask is None or (num_dead := int(mask.sum())) == 0:
            return sae_out.new_tensor(0.0)
        dead = mask.nonzero().squeeze(-1)
        k_aux = sae_in.shape[-1] // 2
        scale = min(num_dead / k_aux, 1.0)
        k_aux = min(k_aux, num_dead)
        hidden = torch.addmm(self.b_enc[dead], sae_in, self.W_enc[:, dead]) * norm[dead]     # [B, dead]
        if k_aux < num_dead:                  # the top k_aux of the dead; with no more dead than that, all of them
            top = hidden.topk(k_aux, dim=-1, sorted=False)
            hidden = torch.zeros_like(hidden).scatter(-1, top.indices, top.values)
        recons = hidden @ unit[dead]
        residual = (step_input.sae_in - sae_out).detach()
        return self.cfg.aux_loss_coefficient * scale * (recons - residual).pow(2).sum(dim=-1).mean()
