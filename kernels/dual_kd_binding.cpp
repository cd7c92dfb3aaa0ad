// Torch binding of the fused dual-student loss kernel (dual_kd_loss.cu, plain CUDA).
//
// Built on first use by fastkd/kernels/build.py (torch.utils.cpp_extension.load). Called by the
// CUDA implementation of the custom op `fastkd::dual_kd_loss` (fastkd/kernels/op.py), which
// owns the schema, the fake implementation and the autograd formula.
//
//   forward(teacher?, s_a, s_b?, labels, T, T_w, a_ce, a_kd, a_peer, eps, weighting, need_grad)
//     -> [loss [B] f32, parts [n, B, 3] f32, w [B] f32, grads [n, B, C] (or [0, B, C]) logits' dtype]
//   forward_out(...same inputs but need_grad..., loss, parts, w, grads)   writes into given tensors
//     (tests fill them with NaN first, so an element the kernel forgets to write fails).

#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <vector>

#include "dual_kd_loss.h"

namespace {

fastkd::DType kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return fastkd::DType::kFloat32;
    case at::kHalf: return fastkd::DType::kFloat16;
    case at::kBFloat16: return fastkd::DType::kBFloat16;
    default: TORCH_CHECK(false, "fastkd::dual_kd_loss: logits must be float32, float16 or bfloat16, got ", t);
  }
}

void check_logits(const at::Tensor& x, const at::Tensor& s_a, const char* name) {
  TORCH_CHECK(x.is_cuda(), "fastkd::dual_kd_loss: ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == s_a.device(), "fastkd::dual_kd_loss: ", name, " is on ", x.device(),
              ", s_a on ", s_a.device());
  TORCH_CHECK(x.sizes() == s_a.sizes(), "fastkd::dual_kd_loss: ", name, " has shape ", x.sizes(),
              ", s_a ", s_a.sizes());
  TORCH_CHECK(x.scalar_type() == s_a.scalar_type(), "fastkd::dual_kd_loss: ", name, " is ",
              x.scalar_type(), ", s_a ", s_a.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "fastkd::dual_kd_loss: ", name, " must be contiguous");
}

void check_out(const at::Tensor& x, at::IntArrayRef shape, at::ScalarType dtype, const at::Tensor& s_a,
               const char* name) {
  TORCH_CHECK(x.device() == s_a.device() && x.sizes() == shape && x.scalar_type() == dtype &&
                  x.is_contiguous(),
              "fastkd::dual_kd_loss: output ", name, " must be a contiguous ", dtype, " tensor of shape ",
              shape, " on ", s_a.device());
}

void forward_out(const c10::optional<at::Tensor>& teacher, const at::Tensor& s_a,
                 const c10::optional<at::Tensor>& s_b, const at::Tensor& labels, double temperature,
                 double entropy_temperature, double a_ce, double a_kd, double a_peer,
                 double label_smoothing, bool weighting, at::Tensor loss, at::Tensor parts, at::Tensor w,
                 at::Tensor grads) {
  TORCH_CHECK(s_a.is_cuda() && s_a.dim() == 2, "fastkd::dual_kd_loss: s_a must be a 2-D CUDA tensor [B, C]");
  TORCH_CHECK(s_a.is_contiguous(), "fastkd::dual_kd_loss: s_a must be contiguous");
  const int64_t B = s_a.size(0), C = s_a.size(1);
  TORCH_CHECK(C >= 2 && C <= INT32_MAX, "fastkd::dual_kd_loss: need 2 <= C < 2^31 classes, got ", C);
  const bool has_t = teacher.has_value() && teacher->defined();
  const bool has_b = s_b.has_value() && s_b->defined();
  if (has_t) check_logits(*teacher, s_a, "teacher");
  if (has_b) check_logits(*s_b, s_a, "s_b");
  TORCH_CHECK(labels.device() == s_a.device() && labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                  labels.size(0) == B && labels.is_contiguous(),
              "fastkd::dual_kd_loss: labels must be a contiguous int64 [B] tensor on ", s_a.device());
  TORCH_CHECK(temperature > 0 && entropy_temperature > 0, "fastkd::dual_kd_loss: temperatures must be > 0");
  const int64_t n = has_b ? 2 : 1;
  check_out(loss, {B}, at::kFloat, s_a, "loss");
  check_out(parts, {n, B, 3}, at::kFloat, s_a, "parts");
  check_out(w, {B}, at::kFloat, s_a, "w");
  const bool need_grad = grads.size(0) != 0;  // [n, B, C], or [0, B, C] for no gradient
  check_out(grads, {need_grad ? n : 0, B, C}, s_a.scalar_type(), s_a, "grads");

  fastkd::DualKdParams p{};
  p.teacher = has_t ? teacher->data_ptr() : nullptr;
  p.s_a = s_a.data_ptr();
  p.s_b = has_b ? s_b->data_ptr() : nullptr;
  p.labels = labels.data_ptr<int64_t>();
  p.loss = loss.data_ptr<float>();
  p.parts = parts.data_ptr<float>();
  p.w = w.data_ptr<float>();
  p.grad_a = (need_grad && B > 0) ? grads[0].data_ptr() : nullptr;
  p.grad_b = (need_grad && has_b && B > 0) ? grads[1].data_ptr() : nullptr;
  p.B = B;
  p.C = static_cast<int>(C);
  p.temperature = static_cast<float>(temperature);
  p.entropy_temperature = static_cast<float>(entropy_temperature);
  p.a_ce = static_cast<float>(a_ce);
  p.a_kd = static_cast<float>(a_kd);
  p.a_peer = static_cast<float>(a_peer);
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.weighting = weighting;
  p.dtype = kernel_dtype(s_a.scalar_type());

  const c10::cuda::CUDAGuard guard(s_a.device());
  const cudaError_t err = fastkd::dual_kd_loss_launch(p, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "fastkd::dual_kd_loss: kernel launch failed: ", cudaGetErrorString(err));
}

std::vector<at::Tensor> forward(const c10::optional<at::Tensor>& teacher, const at::Tensor& s_a,
                                const c10::optional<at::Tensor>& s_b, const at::Tensor& labels,
                                double temperature, double entropy_temperature, double a_ce, double a_kd,
                                double a_peer, double label_smoothing, bool weighting, bool need_grad) {
  TORCH_CHECK(s_a.dim() == 2, "fastkd::dual_kd_loss: s_a must be [B, C], got ", s_a.sizes());
  const int64_t B = s_a.size(0), C = s_a.size(1);
  const bool has_b = s_b.has_value() && s_b->defined();
  const auto f32 = s_a.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({B}, f32);
  const int64_t n = has_b ? 2 : 1;
  at::Tensor parts = at::empty({n, B, 3}, f32);
  at::Tensor w = at::empty({B}, f32);
  at::Tensor grads = at::empty({need_grad ? n : 0, B, C}, s_a.options());
  forward_out(teacher, s_a, s_b, labels, temperature, entropy_temperature, a_ce, a_kd, a_peer, label_smoothing,
              weighting, loss, parts, w, grads);
  return {loss, parts, w, grads};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastkd fused dual-student distillation loss (CUDA)";
  m.def("forward", &forward, "loss, parts, w, grads of the fused loss");
  m.def("forward_out", &forward_out, "the fused loss written into given output tensors");
}
