// Environment switches of the CPU kernels (DNF_CPU_*; docs/design.md §12). One reader for all of them, so every
// switch treats an empty value as unset and a bad value gets the same error naming the variable, the values it
// accepts and the value it got. densenet_fast/_switches.py holds the same table and checks it before the
// library loads (the load-time choices, such as the ISA, must not throw).
#pragma once

#include <initializer_list>
#include <string>

namespace dnf::cpu {

// The value of switch `name`, or "" when it is unset, empty or "auto". Throws (c10::Error) naming `name`,
// `allowed` and the value when the value is not one of `allowed`.
std::string cpu_switch(const char* name, std::initializer_list<const char*> allowed);

// The same, for choices made while the library loads: a value outside `allowed` reads as "" (the Python
// loader has already refused it with the error above).
std::string cpu_switch_nothrow(const char* name, std::initializer_list<const char*> allowed);

}  // namespace dnf::cpu
