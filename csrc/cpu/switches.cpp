#include "cpu/switches.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <sstream>

namespace dnf::cpu {
namespace {

// The raw value with surrounding blanks dropped ("" when unset); "auto" is the default of every switch.
std::string raw(const char* name) {
  const char* env = std::getenv(name);
  std::string v = env == nullptr ? "" : env;
  const auto b = v.find_first_not_of(" \t"), e = v.find_last_not_of(" \t");
  v = b == std::string::npos ? "" : v.substr(b, e - b + 1);
  return v == "auto" ? "" : v;
}

bool allowed_value(const std::string& v, std::initializer_list<const char*> allowed) {
  for (const char* a : allowed)
    if (v == a) return true;
  return false;
}

}  // namespace

std::string cpu_switch(const char* name, std::initializer_list<const char*> allowed) {
  const std::string v = raw(name);
  if (v.empty() || allowed_value(v, allowed)) return v;
  std::ostringstream msg;
  msg << name << ": expected one of auto";
  for (const char* a : allowed) msg << ", " << a;
  msg << " (or unset), got '" << v << "'";
  TORCH_CHECK(false, msg.str());
}

std::string cpu_switch_nothrow(const char* name, std::initializer_list<const char*> allowed) {
  const std::string v = raw(name);
  return allowed_value(v, allowed) ? v : "";
}

}  // namespace dnf::cpu
