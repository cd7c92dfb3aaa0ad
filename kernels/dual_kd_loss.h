// Fused uncertainty-aware dual-student distillation loss: plain C++/CUDA interface.
//
// No torch headers here or in dual_kd_loss.cu, so that the kernel compiles with nvcc alone
// (tests/test_losses.py builds it for sm_80 and sm_90). The torch binding is
// dual_kd_binding.cpp; the maths is written out in dual_kd_loss.cu and in
// fastkd/kernels/op.py (the CPU twin), and specified in docs/LOSS.md.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fastkd {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// All [B, C] tensors are row-major and contiguous (row stride C) and share one dtype.
struct DualKdParams {
  const void* teacher;    // [B, C] teacher logits, or nullptr: no KD term, w = 1
  const void* s_a;        // [B, C] student A logits
  const void* s_b;        // [B, C] student B logits, or nullptr: one student, no peer term
  const int64_t* labels;  // [B] class indices; outside [0, C) makes that row's CE NaN
  float* loss;            // [B] out: L_A + L_B per sample
  float* parts;           // [n_students, B, 3] out: weighted (ce, kd, peer) per student and row
  float* w;               // [B] out: teacher confidence weight (1 when weighting is off)
  void* grad_a;           // [B, C] out (input dtype): dloss[b]/ds_a[b, :], or nullptr
  void* grad_b;           // [B, C] out (input dtype): dloss[b]/ds_b[b, :], or nullptr
                          // (the binding points them at grads[0] and grads[1] of one [n, B, C])
  int64_t B;              // rows
  int C;                  // classes, >= 2
  float temperature;      // T of the KD and peer softmaxes
  float entropy_temperature;  // T_w of the teacher softmax whose entropy gives w
  float a_ce;             // weight of the (label-smoothed) cross-entropy
  float a_kd;             // weight of w * T^2 * KL(p_t || p_s); 0 switches it off
  float a_peer;           // weight of T^2 * KL(p_peer || p_s); 0 switches it off
  float label_smoothing;  // epsilon of the CE target (1 - eps) * onehot + eps / C
  bool weighting;         // w = 1 - H(softmax(t / T_w)) / log C if true, else w = 1
  DType dtype;            // dtype of teacher, s_a, s_b, grad_a, grad_b
};

// Enqueues the kernel on `stream`; returns the launch error (cudaSuccess if none).
cudaError_t dual_kd_loss_launch(const DualKdParams& p, cudaStream_t stream);

}  // namespace fastkd
