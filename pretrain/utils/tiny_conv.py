"""Convolutions on tiny maps, for the CPU: NCHW, and the weight gradient as one matrix product.

``SOLVER.CHANNELS_LAST`` on the CPU turns the trunks' 3x3 convolutions whose output map has at
most 9 pixels into :class:`TinyMapConv2d` (``pretrain.engine.launch.to_channels_last``). Those are
ResNet's last stage at 64-96 px, and oneDNN is slowest there: its weight gradient for 512 -> 512
channels on a 2x2 map (batch 64, bf16) takes over 3x the time of the forward pass.

The layer computes the same function as ``nn.Conv2d`` with the same parameter, in two ways:

- input in NCHW (oneDNN's channels-last kernels lose on these maps: 1.18x NCHW's time at 2x2);
- in the backward pass, the weight gradient as a single matrix product over the unfolded
  input (im2col), where P is the number of output pixels and k the kernel size::

      cols = unfold(x)                                     # [N, C_in*k*k, P]
      dL/dW[o, j] = sum_{n, p} dL/dy[n, o, p] * cols[n, j, p]

  The input gradient stays oneDNN's (``aten.convolution_backward``, input only).

Measured with torch 2.14.1 on a 2-core AVX512-BF16 CPU, batch 64, medians of 8 rounds, the
weight gradient by oneDNN vs by this product: bf16 512 -> 512 at 2x2 9.4 vs 6.3 ms, 256 -> 512
stride 2 (4x4 -> 2x2) 6.5 vs 3.2 ms, 512 -> 512 at 3x3 12.5 vs 11.3 ms; float32 at 2x2 21.6 vs
12.6 ms. At 4x4 outputs (256 -> 256) the product loses (oneDNN 4.4 ms, the product 7.9 ms),
hence the 9-pixel bound. Results equal ``nn.Conv2d``'s up to the order of float sums.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _TinyMapConv(torch.autograd.Function):
    """y = conv2d(x, w) (no bias, groups 1); backward: dx by oneDNN, dW by im2col + one GEMM."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation)
        return F.conv2d(x, weight, None, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conv
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(
                grad_y, x, weight, None, stride, padding, dilation, False, [0, 0], 1,
                [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            c_out, c_in, kh, kw = weight.shape
            n, p = grad_y.shape[0], grad_y.shape[2] * grad_y.shape[3]
            cols = F.unfold(x, (kh, kw), dilation, padding, stride)  # [N, C_in*kh*kw, P]
            g = grad_y.reshape(n, c_out, p).transpose(0, 1).reshape(c_out, n * p)  # [C_out, N*P]
            cols = cols.transpose(1, 2).reshape(n * p, c_in * kh * kw)  # [N*P, C_in*kh*kw]
            grad_w = (g @ cols).view(c_out, c_in, kh, kw)  # [C_out, C_in, kh, kw]
        return grad_x, grad_w, None, None, None


class TinyMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` (no bias, groups 1) for maps of a few pixels on the CPU: NCHW input, the
    weight gradient as one matrix product (module docstring). Parameter names are Conv2d's."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> TinyMapConv2d:
        """A TinyMapConv2d holding ``conv``'s own weight Parameter (an optimizer that already has
        it keeps stepping it), with an NCHW copy of its values if they were channels-last."""
        if conv.bias is not None or conv.groups != 1 or conv.padding_mode != "zeros" or \
                isinstance(conv.padding, str):
            raise ValueError(f"TinyMapConv2d needs a convolution without bias, groups or "
                             f"string/non-zero padding; got {conv}")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                  conv.padding, conv.dilation, bias=False, device="meta")
        new.weight = conv.weight
        new.weight.data = new.weight.data.contiguous()
        new.train(conv.training)
        return new

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        kind = x.device.type
        if torch.is_autocast_enabled(kind):  # what autocast does for conv2d, made explicit
            dtype = torch.get_autocast_dtype(kind)
            x, weight = x.to(dtype), weight.to(dtype)
        with torch.autocast(kind, enabled=False):
            return _TinyMapConv.apply(x.contiguous(), weight, list(self.stride),
                                      list(self.padding), list(self.dilation))
