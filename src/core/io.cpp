#include "grace/io.hpp"

#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "grace/error.hpp"

namespace fs = std::filesystem;

namespace grace {

namespace {

std::string temp_name_for(const fs::path& target) {
    static std::atomic<uint64_t> counter{0};
    // Appended piece by piece: `"." + std::string&&` trips GCC 12's bogus -Wrestrict (GCC bug 105651, see also 105329).
    std::string name = ".";
    name += target.filename().string();
    name += ".tmp.";
    name += std::to_string(::getpid());
    name += '.';
    name += std::to_string(counter++);
    return (target.parent_path() / name).string();
}

}  // namespace

void check_output_dir(const std::string& path) {
    fs::path parent = fs::path(path).parent_path();
    if (parent.empty()) return;
    std::error_code ec;
    GRACE_CHECK(fs::is_directory(parent, ec), ErrorCode::kIo, "output folder does not exist: ", parent.string());
}

void write_file_atomic(const std::string& path, const std::function<void(const std::string&)>& write) {
    GRACE_CHECK(!path.empty(), ErrorCode::kIo, "empty output path");
    check_output_dir(path);
    std::error_code ec;
    GRACE_CHECK(!fs::is_directory(path, ec), ErrorCode::kIo, "output path is a folder: ", path);
    std::string tmp = temp_name_for(fs::path(path));
    try {
        write(tmp);
        fs::rename(tmp, path);
    } catch (const fs::filesystem_error& e) {
        fs::remove(tmp, ec);
        throw Error(ErrorCode::kIo, cat("cannot write ", path, ": ", e.code().message()));
    } catch (...) {
        fs::remove(tmp, ec);
        throw;
    }
}

void write_text_atomic(const std::string& path, const std::string& contents) {
    write_file_atomic(path, [&](const std::string& tmp) {
        std::ofstream out(tmp, std::ios::binary);
        GRACE_CHECK(out.good(), ErrorCode::kIo, "cannot open ", path, " for writing");
        out.write(contents.data(), static_cast<std::streamsize>(contents.size()));
        out.close();
        GRACE_CHECK(out.good(), ErrorCode::kIo, "error while writing ", path);
    });
}

std::string read_text(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    GRACE_CHECK(in.good(), ErrorCode::kIo, "cannot read ", path);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

void write_dir_atomic(const std::string& dir, const std::function<void(const std::string&)>& fill) {
    GRACE_CHECK(!dir.empty(), ErrorCode::kIo, "empty output path");
    fs::path target = fs::path(dir);
    if (target.filename().empty()) target = target.parent_path();  // "out/" -> "out"
    check_output_dir(target.string());
    std::error_code ec;
    GRACE_CHECK(!fs::exists(target, ec) || fs::is_directory(target, ec), ErrorCode::kIo,
                "output path exists and is not a folder: ", target.string());
    std::string tmp = temp_name_for(target);
    fs::create_directory(tmp, ec);
    GRACE_CHECK(!ec, ErrorCode::kIo, "cannot create ", tmp, ": ", ec.message());
    try {
        fill(tmp);
        std::string old;
        if (fs::exists(target, ec)) {
            old = temp_name_for(target) + ".old";
            fs::rename(target, old);
        }
        fs::rename(tmp, target);
        if (!old.empty()) fs::remove_all(old, ec);
    } catch (const fs::filesystem_error& e) {
        fs::remove_all(tmp, ec);
        throw Error(ErrorCode::kIo, cat("cannot write ", target.string(), ": ", e.code().message()));
    } catch (...) {
        fs::remove_all(tmp, ec);
        throw;
    }
}

}  // namespace grace
