#include "grace/io.hpp"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <system_error>

#include "grace/error.hpp"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace grace {

namespace {

constexpr const char* kMarkerFormat = "grace.output/v1";

std::string errno_text(int err) { return std::error_code(err, std::generic_category()).message(); }

[[noreturn]] void throw_write_error(const std::string& target, const std::string& cause) {
    throw Error(ErrorCode::kIo, cat("cannot write ", target, ": ", cause));
}

/// `.NAME.tmp.PID.N` beside `target`; N counts up within the process so that names never repeat.
std::string temp_name_for(const fs::path& target) {
    static std::atomic<uint64_t> counter{0};
    std::string name = ".";  // appended piecewise: GCC 12 warns (-Wrestrict, falsely) on "." + string
    name.append(target.filename().string());
    name.append(".tmp.");
    name.append(std::to_string(::getpid()));
    name.append(".");
    name.append(std::to_string(counter++));
    return (target.parent_path() / name).string();
}

/// The PID of `name` if it is a temporary of the file named `target_name`, else -1: `.NAME.tmp.PID.N`, the same
/// with `.old` (a replaced folder), or a temporary of such a temporary (a writer that stages through a nested atomic
/// write, e.g. write_npy into an OutputSet's temporary). `is_old` tells whether it ends in `.old`.
long temp_pid(const std::string& name, const std::string& target_name, bool& is_old) {
    std::string rest = name;
    is_old = rest.size() > 4 && rest.compare(rest.size() - 4, 4, ".old") == 0;
    if (is_old) rest.resize(rest.size() - 4);
    const size_t tag = rest.rfind(".tmp.");
    if (rest.size() < 2 || rest[0] != '.' || tag == std::string::npos || tag < 1) return -1;
    const std::string digits = rest.substr(tag + 5);  // PID.N
    const size_t dot = digits.find('.');
    if (dot == std::string::npos || dot == 0 || dot + 1 == digits.size() || dot > 9) return -1;
    for (size_t i = 0; i < digits.size(); ++i)
        if (i != dot && (digits[i] < '0' || digits[i] > '9')) return -1;
    const std::string base = rest.substr(1, tag - 1);
    bool inner_old = false;
    if (base != target_name && (temp_pid(base, target_name, inner_old) < 0 || inner_old)) return -1;
    return std::stol(digits.substr(0, dot));
}

bool pid_alive(long pid) {
    if (pid <= 0) return true;  // never a grace temporary: leave it alone
    if (::kill(static_cast<pid_t>(pid), 0) == 0) return true;
    return errno != ESRCH;  // EPERM: someone else's live process
}

/// "out/" -> "out"; "." and ".." become absolute so that the folder has a name to rename.
fs::path normal_target(const std::string& path) {
    fs::path p = fs::path(path).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();
    if (p.empty() || p.filename() == "." || p.filename() == "..") p = fs::absolute(p).lexically_normal();
    if (p.filename().empty()) p = p.parent_path();
    return p;
}

std::string trimmed(const std::string& dir) {
    std::string s = dir;
    while (s.size() > 1 && s.back() == '/') s.pop_back();
    return s;
}

void replace_all(std::string& s, const std::string& from, const std::string& to) {
    if (from.empty()) return;
    for (size_t pos = s.find(from); pos != std::string::npos; pos = s.find(from, pos + to.size()))
        s.replace(pos, from.size(), to);
}

/// The files (relative, '/'-separated) that the marker of `dir` lists; false if it has no readable marker.
bool read_marker(const fs::path& dir, std::string& kind, std::set<std::string>& files) {
    std::ifstream in(dir / kOutputMarker, std::ios::binary);
    if (!in.good()) return false;
    std::ostringstream ss;
    ss << in.rdbuf();
    const json j = json::parse(ss.str(), nullptr, false);
    if (!j.is_object() || j.value("format", "") != kMarkerFormat || !j.contains("kind") || !j["kind"].is_string() ||
        !j.contains("files") || !j["files"].is_array())
        return false;
    kind = j["kind"].get<std::string>();
    for (const auto& f : j["files"]) {
        if (!f.is_string()) return false;
        files.insert(f.get<std::string>());
    }
    return true;
}

/// Regular files under `dir`, relative and '/'-separated, sorted; `other` gets the first entry that is neither a
/// folder nor a regular file (a link, a device), if any.
std::vector<std::string> list_files(const fs::path& dir, std::string* other = nullptr) {
    std::vector<std::string> out;
    for (auto it = fs::recursive_directory_iterator(dir); it != fs::recursive_directory_iterator(); ++it) {
        const fs::file_status st = it->symlink_status();
        const std::string rel = it->path().lexically_relative(dir).generic_string();
        if (fs::is_regular_file(st))
            out.push_back(rel);
        else if (!fs::is_directory(st) && other && other->empty())
            *other = rel;
    }
    std::sort(out.begin(), out.end());
    return out;
}

/// Removes from the set-aside folder `dir` only what grace wrote there: the files its marker lists, then folders
/// that became empty, then the marker and `dir` itself if nothing else is left. Never throws.
void remove_grace_folder(const fs::path& dir) {
    std::error_code ec;
    std::string kind;
    std::set<std::string> files;
    if (read_marker(dir, kind, files)) {
        for (const auto& f : files) {
            const fs::path p = (dir / fs::path(f)).lexically_normal();
            // Only inside `dir`, and only regular files: a marker cannot point grace at anything else.
            if (p.lexically_relative(dir).string().rfind("..", 0) == 0) continue;
            if (fs::is_regular_file(fs::symlink_status(p, ec))) fs::remove(p, ec);
        }
    }
    std::vector<fs::path> dirs;
    for (auto it = fs::recursive_directory_iterator(dir, ec); !ec && it != fs::recursive_directory_iterator();
         it.increment(ec))
        if (fs::is_directory(it->symlink_status(ec))) dirs.push_back(it->path());
    std::sort(dirs.rbegin(), dirs.rend());         // children before parents
    for (const auto& d : dirs) fs::remove(d, ec);  // fails, harmlessly, on a non-empty folder
    int left = 0;
    bool marker_left = false;
    for (fs::directory_iterator it(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
        ++left;
        marker_left |= it->path().filename() == kOutputMarker;
    }
    if (!ec && left == 1 && marker_left) fs::remove(dir / kOutputMarker, ec);
    fs::remove(dir, ec);  // fails, harmlessly, if anything grace did not write is left
}

/// Why write_dir_atomic may not replace `target`, or "" if it may.
std::string replace_refusal(const fs::path& target, const std::string& kind) {
    std::error_code ec;
    const fs::file_status st = fs::symlink_status(target, ec);
    if (!fs::exists(st)) return "";
    if (fs::is_symlink(st)) return "it is a symbolic link";
    if (!fs::is_directory(st)) return "it exists and is not a folder";
    if (fs::is_empty(target, ec) && !ec) return "";
    std::string found_kind;
    std::set<std::string> files;
    if (!fs::exists(fs::symlink_status(target / kOutputMarker, ec)))
        return cat("it is not a grace ", kind, " output (no ", kOutputMarker, " marker)");
    if (!read_marker(target, found_kind, files))
        return cat("it is not a grace ", kind, " output (unreadable ", kOutputMarker, " marker)");
    if (found_kind != kind) return cat("it is a grace ", found_kind, " output, not a ", kind, " output");
    std::string other;
    std::vector<std::string> present;
    try {
        present = list_files(target, &other);
    } catch (const fs::filesystem_error& e) {
        return cat("cannot list it (", e.code().message(), ")");
    }
    if (!other.empty()) return cat("it holds ", other, ", which grace did not write");
    for (const auto& f : present)
        if (f != kOutputMarker && !files.count(f)) return cat("it holds ", f, ", which grace did not write");
    return "";
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// OutputFile

OutputFile::OutputFile(const std::string& path, const std::string& target) : target_(target) {
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd_ < 0) throw_write_error(target_, errno_text(errno));
}

OutputFile::~OutputFile() {
    if (fd_ >= 0) ::close(fd_);
}

void OutputFile::write(const void* data, size_t size) {
    GRACE_CHECK(fd_ >= 0, ErrorCode::kIo, "cannot write ", target_, ": file already closed");
    const char* p = static_cast<const char*>(data);
    while (size > 0) {
        const ssize_t n = ::write(fd_, p, size);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) throw_write_error(target_, errno_text(n < 0 ? errno : EIO));
        p += n;
        size -= static_cast<size_t>(n);
    }
}

void OutputFile::close() {
    if (fd_ < 0) return;
    const int fd = fd_;
    fd_ = -1;
    if (::close(fd) != 0) throw_write_error(target_, errno_text(errno));
}

// ---------------------------------------------------------------------------------------------------------------
// OutputSet

OutputSet::~OutputSet() {
    std::error_code ec;
    for (const auto& s : staged_) fs::remove(s.tmp, ec);
}

void OutputSet::add(const std::string& path, const std::function<void(const std::string&)>& write) {
    GRACE_CHECK(!path.empty(), ErrorCode::kIo, "empty output path");
    check_output_file(path);
    const std::string norm = fs::path(path).lexically_normal().string();
    for (const auto& s : staged_)
        GRACE_CHECK(fs::path(s.target).lexically_normal().string() != norm, ErrorCode::kIo, "cannot write ", path,
                    ": the same output is written twice");
    remove_stale_temporaries(path);
    staged_.push_back({path, temp_name_for(fs::path(path))});
    const std::string tmp = staged_.back().tmp;
    const auto discard = [&] {
        std::error_code ec;
        fs::remove(tmp, ec);
        staged_.pop_back();
    };
    try {
        write(tmp);
    } catch (const Error& e) {
        discard();
        std::string msg = e.what();  // a nested atomic write names the temporary: name the target instead
        replace_all(msg, tmp, path);
        throw Error(e.code(), msg);
    } catch (const fs::filesystem_error& e) {
        discard();
        throw_write_error(path, e.code().message());
    } catch (...) {
        discard();
        throw;
    }
}

void OutputSet::add_text(const std::string& path, std::string_view contents) {
    add(path, [&](const std::string& tmp) {
        OutputFile out(tmp, path);
        out.write(contents.data(), contents.size());
        out.close();
    });
}

void OutputSet::commit() {
    std::error_code ec;
    // Check all before renaming any: every temporary is still a complete regular file, no target became a folder.
    for (const auto& s : staged_) {
        GRACE_CHECK(fs::is_regular_file(fs::symlink_status(s.tmp, ec)), ErrorCode::kIo, "cannot write ", s.target,
                    ": its temporary ", fs::path(s.tmp).filename().string(), " disappeared");
        GRACE_CHECK(!fs::is_directory(s.target, ec), ErrorCode::kIo, "output path is a folder: ", s.target);
    }
    // The last file is the metadata naming the others: take the old one away first, put the new one in last.
    if (staged_.size() > 1) {
        const std::string& meta = staged_.back().target;
        if (!fs::remove(meta, ec) && ec) throw_write_error(meta, ec.message());
    }
    while (!staged_.empty()) {
        const Staged s = staged_.front();
        fs::rename(s.tmp, s.target, ec);
        if (ec) throw_write_error(s.target, ec.message());  // the destructor removes what is still staged
        staged_.erase(staged_.begin());
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Single files

void check_output_dir(const std::string& path) {
    fs::path parent = fs::path(path).parent_path();
    if (parent.empty()) return;
    std::error_code ec;
    GRACE_CHECK(fs::is_directory(parent, ec), ErrorCode::kIo, "output folder does not exist: ", parent.string());
}

void check_output_file(const std::string& path) {
    GRACE_CHECK(!path.empty(), ErrorCode::kIo, "empty output path");
    check_output_dir(path);
    std::error_code ec;
    GRACE_CHECK(!fs::is_directory(path, ec), ErrorCode::kIo, "output path is a folder: ", path);
}

void write_file_atomic(const std::string& path, const std::function<void(const std::string&)>& write) {
    OutputSet set;
    set.add(path, write);
    set.commit();
}

void write_text_atomic(const std::string& path, const std::string& contents) {
    OutputSet set;
    set.add_text(path, contents);
    set.commit();
}

std::string read_text(const std::string& path) {
    std::error_code ec;  // a folder opens as an empty stream on Linux: say what it is, not "not valid JSON"
    GRACE_CHECK(!fs::is_directory(path, ec), ErrorCode::kIo, path, ": is a folder, not a file");
    std::ifstream in(path, std::ios::binary);
    GRACE_CHECK(in.good(), ErrorCode::kIo, "cannot read ", path);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// ---------------------------------------------------------------------------------------------------------------
// Folders

int remove_stale_temporaries(const std::string& target_in) {
    const fs::path target = normal_target(target_in);
    const std::string name = target.filename().string();
    fs::path parent = target.parent_path();
    if (parent.empty()) parent = ".";
    std::error_code ec;
    std::vector<fs::path> stale;
    std::vector<bool> old;
    for (fs::directory_iterator it(parent, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
        bool is_old = false;
        const long pid = temp_pid(it->path().filename().string(), name, is_old);
        if (pid < 0 || pid_alive(pid)) continue;
        stale.push_back(it->path());
        old.push_back(is_old);
    }
    for (size_t i = 0; i < stale.size(); ++i) {
        const fs::file_status st = fs::symlink_status(stale[i], ec);
        if (old[i] && fs::is_directory(st))
            remove_grace_folder(stale[i]);  // a replaced output: only what its marker lists
        else if (fs::is_directory(st))
            fs::remove_all(stale[i], ec);  // a folder grace was filling: all of it is grace's
        else
            fs::remove(stale[i], ec);
    }
    return static_cast<int>(stale.size());
}

void check_output_folder(const std::string& dir, const std::string& kind) {
    GRACE_CHECK(!dir.empty(), ErrorCode::kIo, "empty output path");
    const fs::path target = normal_target(dir);
    check_output_dir(target.string());
    const std::string why = replace_refusal(target, kind);
    GRACE_CHECK(why.empty(), ErrorCode::kIo, "refusing to replace folder ", trimmed(dir), ": ", why,
                "; choose another -o or remove it");
}

void write_dir_atomic(const std::string& dir, const std::string& kind,
                      const std::function<void(const std::string&)>& fill) {
    check_output_folder(dir, kind);
    const std::string shown = trimmed(dir);
    const fs::path target = normal_target(dir);
    remove_stale_temporaries(target.string());
    const std::string tmp = temp_name_for(target);
    std::error_code ec;
    fs::create_directory(tmp, ec);
    if (ec) throw_write_error(shown, ec.message());
    try {
        fill(tmp);
        json marker = {{"format", kMarkerFormat}, {"kind", kind}, {"files", list_files(tmp)}};
        write_text_atomic((fs::path(tmp) / kOutputMarker).string(), marker.dump(2) + "\n");
        // The folder may have changed during a long fill: check again just before replacing it.
        check_output_folder(dir, kind);
        const fs::file_status st = fs::symlink_status(target, ec);
        if (!fs::exists(st) || fs::is_empty(target, ec)) {
            fs::rename(tmp, target);  // an empty folder is replaced by rename itself
            return;
        }
        const std::string old = temp_name_for(target) + ".old";
        fs::rename(target, old);
        try {
            fs::rename(tmp, target);
        } catch (...) {
            fs::rename(old, target, ec);  // put the previous output back
            throw;
        }
        remove_grace_folder(old);
    } catch (const Error& e) {
        fs::remove_all(tmp, ec);
        std::string msg = e.what();
        replace_all(msg, tmp, shown);
        throw Error(e.code(), msg);
    } catch (const fs::filesystem_error& e) {
        fs::remove_all(tmp, ec);
        throw_write_error(shown, e.code().message());
    } catch (...) {
        fs::remove_all(tmp, ec);
        throw;
    }
}

}  // namespace grace
