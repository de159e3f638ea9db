// PYBIND11_MODULE for rln_fast._C: the <op>_forward / <op>_backward entries and build facts.
#include <torch/extension.h>

#include <string>
#include <vector>

namespace rln_fast {
std::vector<at::Tensor> conv3d_forward(const std::vector<at::Tensor>&, const at::Tensor&,
                                       const c10::optional<at::Tensor>&, int64_t,
                                       const c10::optional<at::Tensor>&, bool);
std::vector<at::Tensor> conv3d_backward(const at::Tensor&, const std::vector<at::Tensor>&,
                                        const at::Tensor&, const c10::optional<at::Tensor>&,
                                        int64_t, const c10::optional<at::Tensor>&,
                                        const at::Tensor&, const std::vector<bool>&);
at::Tensor conv3d_rl_divide_forward(const std::vector<at::Tensor>&, const at::Tensor&,
                                    const c10::optional<at::Tensor>&, int64_t,
                                    const c10::optional<at::Tensor>&, const at::Tensor&, double,
                                    double, double);
at::Tensor conv3d_rl_multiply_forward(const std::vector<at::Tensor>&, const at::Tensor&,
                                      const c10::optional<at::Tensor>&, int64_t,
                                      const c10::optional<at::Tensor>&, double);
at::Tensor rl_divide_forward(const at::Tensor&, const at::Tensor&, double, double, double);
std::vector<at::Tensor> rl_divide_backward(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                           double, double, double, bool, bool, bool);
at::Tensor rl_multiply_forward(const at::Tensor&, const at::Tensor&, double);
std::vector<at::Tensor> rl_multiply_backward(const at::Tensor&, const at::Tensor&,
                                             const at::Tensor&, double, bool, bool, bool);
at::Tensor rl_ratio_forward(const at::Tensor&, const at::Tensor&, double, double,
                            const c10::optional<at::Tensor>&);
void rl_predict_forward(const at::Tensor&, const at::Tensor&, double, double);
std::vector<at::Tensor> rl_update_forward(const at::Tensor&, const at::Tensor&,
                                          const c10::optional<at::Tensor>&,
                                          const c10::optional<at::Tensor>&,
                                          const c10::optional<at::Tensor>&,
                                          const c10::optional<at::Tensor>&,
                                          const c10::optional<at::Tensor>&, double, double, double,
                                          double, bool, const c10::optional<at::Tensor>&);
at::Tensor psf_conv_ratio_forward(const at::Tensor&, const at::Tensor&, const at::Tensor&, double,
                                  double);
std::vector<at::Tensor> psf_conv_update_forward(const at::Tensor&, const at::Tensor&,
                                                const at::Tensor&, const c10::optional<at::Tensor>&,
                                                const c10::optional<at::Tensor>&,
                                                const c10::optional<at::Tensor>&,
                                                const c10::optional<at::Tensor>&,
                                                const c10::optional<at::Tensor>&, double, double,
                                                double, double, const c10::optional<at::Tensor>&);
void set_conv3d_smem_limit(int64_t);
int64_t max_cin_per_launch(int64_t, int64_t, int64_t);
}  // namespace rln_fast

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "rln_fast fused kernels (CPU always; CUDA when built with it)";
  m.def("conv3d_forward", &rln_fast::conv3d_forward);
  m.def("conv3d_backward", &rln_fast::conv3d_backward);
  m.def("conv3d_rl_divide_forward", &rln_fast::conv3d_rl_divide_forward);
  m.def("conv3d_rl_multiply_forward", &rln_fast::conv3d_rl_multiply_forward);
  m.def("rl_divide_forward", &rln_fast::rl_divide_forward);
  m.def("rl_divide_backward", &rln_fast::rl_divide_backward);
  m.def("rl_multiply_forward", &rln_fast::rl_multiply_forward);
  m.def("rl_multiply_backward", &rln_fast::rl_multiply_backward);
  m.def("rl_ratio_forward", &rln_fast::rl_ratio_forward);
  m.def("rl_predict_forward", &rln_fast::rl_predict_forward);
  m.def("rl_update_forward", &rln_fast::rl_update_forward);
  m.def("psf_conv_ratio_forward", &rln_fast::psf_conv_ratio_forward);
  m.def("psf_conv_update_forward", &rln_fast::psf_conv_update_forward);
  // Shared memory per block that the conv3d forward plans with, replacing the device's on every
  // device (CPU included) when > 0, so the channel-chunked fallback can be tested anywhere; 0
  // restores the device's own limit.
  m.def("_set_conv3d_smem_limit", &rln_fast::set_conv3d_smem_limit);
  // Input channels one CUDA forward launch can take within smem_limit bytes per block.
  m.def("conv3d_max_cin_per_launch", &rln_fast::max_cin_per_launch);
#ifdef RLN_FAST_WITH_CUDA
  m.def("built_with_cuda", [] { return true; });
  m.def("cuda_arch", [] { return std::string(RLN_FAST_CUDA_ARCH); });
#else
  m.def("built_with_cuda", [] { return false; });
  m.def("cuda_arch", [] { return std::string(); });
#endif
}
