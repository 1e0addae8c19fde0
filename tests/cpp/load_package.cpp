// A C++ deployment of an fxquant package, as docs/export.md describes it: dlopen fxquant's op
// library first (only ops="cxx" packages need it), then torch::inductor::AOTIModelPackageLoader.
// Usage: load_package PACKAGE LIBRARY|- DEVICE DTYPE (INPUT B S D)...
// DEVICE is cpu or cuda, DTYPE float32 or bfloat16 (the model's input). Each INPUT is a raw
// float32 file of B x S x D values; the output goes to INPUT.out (raw float32).
// Exit status 2 and the error on stderr when loading or running throws.
#include <dlfcn.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

int main(int argc, char** argv) {
  if (argc < 5 || (argc - 5) % 4 != 0) {
    std::fprintf(stderr, "usage: %s PACKAGE LIBRARY|- DEVICE DTYPE (INPUT B S D)...\n", argv[0]);
    return 1;
  }
  const at::Device device(argv[3]);
  const at::ScalarType dtype = std::string(argv[4]) == "bfloat16" ? at::kBFloat16 : at::kFloat;
  const std::string library = argv[2];
  if (library != "-" && dlopen(library.c_str(), RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "dlopen failed: %s\n", dlerror());
    return 1;
  }
  try {
    torch::inductor::AOTIModelPackageLoader loader(argv[1]);
    for (int a = 5; a < argc; a += 4) {
      const std::string path = argv[a];
      const int64_t b = std::atoll(argv[a + 1]), s = std::atoll(argv[a + 2]), d = std::atoll(argv[a + 3]);
      at::Tensor x = at::empty({b, s, d}, at::kFloat);
      std::ifstream in(path, std::ios::binary);
      in.read(reinterpret_cast<char*>(x.data_ptr<float>()), x.numel() * sizeof(float));
      if (!in) {
        std::fprintf(stderr, "short input file %s\n", path.c_str());
        return 1;
      }
      at::Tensor y = loader.run({x.to(device, dtype)})[0].to(at::kCPU, at::kFloat).contiguous();
      std::ofstream out(path + ".out", std::ios::binary);
      out.write(reinterpret_cast<const char*>(y.data_ptr<float>()), y.numel() * sizeof(float));
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  std::printf("RAN_OK\n");
  return 0;
}
