//! The seed's files as a vfat file system image, written in memory with `fatfs`: as small as the files allow, the same bytes for the same files.
//!
//! All files are in the root directory: fatfs 0.3.6 (the release) writes long-name
//! entries before a new directory's `.` and `..`, which fsck.fat rejects (rust-fatfs
//! issue 117, fixed by its pull request 100 after that release).

use std::io::{self, Cursor, Write};

use fatfs::{Date, DateTime, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider};
use ssh_key::sha2::{Digest, Sha256};

use super::{SeedFile, LABEL};

const SECTOR: u64 = 512;
/// Entries of the fixed root directory of FAT12/16, 16 a sector: the label and the eight
/// files with their long names take 20.
const ROOT_ENTRIES: u16 = 32;
const ROOT_SECTORS: u64 = ROOT_ENTRIES as u64 * 32 / SECTOR;
/// How often a size fatfs cannot lay out (just past the largest FAT12, say) is grown.
const SIZE_TRIES: usize = 16;

/// Every file's time: the first a FAT date can say, so that the image does not depend on
/// when it was made. (fatfs without its clock gives the invalid month 0 and day 0.)
#[derive(Debug)]
struct DosEpoch;

impl TimeProvider for DosEpoch {
    fn get_current_date(&self) -> Date {
        Date {
            year: 1980,
            month: 1,
            day: 1,
        }
    }

    fn get_current_date_time(&self) -> DateTime {
        DateTime {
            date: self.get_current_date(),
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static DOS_EPOCH: DosEpoch = DosEpoch;

/// The volume serial (what blkid shows as the UUID `XXXX-XXXX`): from the instance id, so
/// that clones' seeds differ and one clone's seed is the same every time it is made.
pub(super) fn volume_id(instance_id: &str) -> u32 {
    let d = Sha256::digest(instance_id.as_bytes());
    u32::from_le_bytes([d[0], d[1], d[2], d[3]])
}

/// The label as a FAT directory entry holds it: 11 bytes, space-padded.
fn label_field() -> [u8; 11] {
    let mut l = [b' '; 11];
    l[..LABEL.len()].copy_from_slice(LABEL.as_bytes());
    l
}

/// A size (in sectors) that holds `files` in 512-byte clusters: their clusters, a FAT of
/// 16-bit entries (FAT12's are smaller), the root directory, the boot sector, and
/// fatfs's minimum of 8 sectors beyond them.
fn first_guess(files: &[SeedFile]) -> u64 {
    let file_clusters: u64 = files
        .iter()
        .map(|f| (f.data.len() as u64).div_ceil(SECTOR))
        .sum();
    let data = file_clusters + 8;
    let fat = ((data + 2) * 2).div_ceil(SECTOR);
    1 + 2 * fat + ROOT_SECTORS + data
}

fn write_image(files: &[SeedFile], volume_id: u32, sectors: u64) -> io::Result<Vec<u8>> {
    let total = u32::try_from(sectors)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "seed too large for FAT"))?;
    let mut disk = Cursor::new(vec![0u8; (sectors * SECTOR) as usize]);
    fatfs::format_volume(
        &mut disk,
        FormatVolumeOptions::new()
            .total_sectors(total)
            .bytes_per_cluster(SECTOR as u32)
            .max_root_dir_entries(ROOT_ENTRIES)
            .volume_id(volume_id)
            .volume_label(label_field()),
    )?;
    {
        let fs = FileSystem::new(&mut disk, FsOptions::new().time_provider(&DOS_EPOCH))?;
        for f in files {
            debug_assert!(!f.path.contains('/'), "no directories: {}", f.path);
            let mut file = fs.root_dir().create_file(f.path)?;
            file.write_all(&f.data)?;
            file.flush()?;
        }
        fs.unmount()?;
    }
    Ok(disk.into_inner())
}

/// The image of `files` (all in the root directory), labelled [`LABEL`].
pub(super) fn image(files: &[SeedFile], volume_id: u32) -> io::Result<Vec<u8>> {
    let mut sectors = first_guess(files);
    let mut last = None;
    for _ in 0..SIZE_TRIES {
        match write_image(files, volume_id, sectors) {
            Ok(image) => return Ok(image),
            Err(e) => last = Some(e),
        }
        // A size fatfs cannot give a FAT type to, or too small by our guess: a bit more.
        sectors += sectors / 8 + 8;
    }
    Err(last.expect("tried at least once"))
}
