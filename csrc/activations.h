#pragma once

#include <cstdint>

enum class Act : int64_t { Identity = 0, Gelu = 1, GeluTanh = 2, GeluNew = 3, Silu = 4, Relu = 5 };
