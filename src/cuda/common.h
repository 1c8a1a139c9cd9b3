// Errors cross the C boundary as malloc'd strings that the Rust side frees with ddpm_free_message;
// nothing here throws into Rust.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

inline char* copy_message(const char* message) {
    size_t n = std::strlen(message) + 1;
    char* out = static_cast<char*>(std::malloc(n));
    if (out != nullptr) {
        std::memcpy(out, message, n);
    }
    return out;
}

// Runs f, turning any exception into *error (c10's without its C++ backtrace) and a return of 1.
template <typename F>
int guarded(char** error, F&& f) {
    try {
        f();
        return 0;
    } catch (const c10::Error& e) {
        *error = copy_message(e.what_without_backtrace());
    } catch (const std::exception& e) {
        *error = copy_message(e.what());
    } catch (...) {
        *error = copy_message("unknown C++ exception");
    }
    return 1;
}
